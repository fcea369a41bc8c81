"""Start-up cost: `import mneme_plugin`, `mneme --help` and every command's `--help`, each in a
fresh interpreter, against `import torch` measured the same way (the reference: what the package
no longer pays at start-up).

    python benchmarks/bench_startup.py [--repeats 5]

Prints the median wall time of each over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}.")
    py = sys.executable
    from mneme_plugin.cli import main as cli

    rows = [("python -c pass", wall([py, "-c", "pass"], args.repeats)),
            ("import torch (reference)", wall([py, "-c", "import torch"], args.repeats)),
            ("import mneme_plugin", wall([py, "-c", "import mneme_plugin"], args.repeats)),
            ("mneme --help", wall([py, "-m", "mneme_plugin.cli", "--help"], args.repeats))]
    commands = sorted(cli.commands)
    per_command = [wall([py, "-m", "mneme_plugin.cli", name, "--help"], args.repeats) for name in commands]
    rows.append((f"mneme COMMAND --help (slowest of {len(commands)})", max(per_command)))
    for name, seconds in rows:
        print(f"{name:<44} {seconds:6.3f} s")
    slowest = commands[per_command.index(max(per_command))]
    print(f"slowest command help: {slowest}")


if __name__ == "__main__":
    main()
