"""One rank of a `mneme run` on two nodes (two torchrun agents on this machine, launched by
test_run.py) whose rank 0 dies (SIGKILL, like a node going down) in a stage it runs alone while the
other rank waits for it. Usage: rank0_dies_worker.py RUN_DIR CORPUS_FILE.
"""

import os
import signal
import sys

from mneme_plugin.pipeline import RunConfig, run_pipeline
from mneme_plugin.pipeline import run as run_module
from mneme_plugin.pipeline.stage import Stage

# Test-sized: rank 0 beats every 0.2 s, the others give up after 5 s without a beat (default 10 s / 10 min).
run_module.HEARTBEAT_SECONDS, run_module.HEARTBEAT_TIMEOUT = 0.2, 5.0


def die(ctx) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    stages = [Stage("alone", (), lambda layout: layout.root / "alone", die),
              Stage("shared", (), lambda layout: layout.root / "shared", lambda ctx: None, all_ranks=True)]
    config = RunConfig.from_dict({"run_dir": sys.argv[1], "models": {"base": "base", "edited": "edited"},
                                  "corpus": {"source": sys.argv[2]}, "harvest": {"layer": 0}})
    run_pipeline(config, stages, models={"base": None, "edited": None}, progress=False)


if __name__ == "__main__":
    main()
