"""One rank of a data-parallel training run (launched by torchrun from test_distributed.py).

Usage: distributed_worker.py STORE RUN_DIR CONFIG_JSON. With MNEME_TEST_CRASH_STEP set, rank
MNEME_TEST_CRASH_RANK dies (os._exit) after that step, like a killed process.
"""

import json
import os
import sys

import torch

from mneme_plugin.crosscoder.training import train


def main() -> None:
    store, run_dir, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    crash_step = int(os.environ.get("MNEME_TEST_CRASH_STEP", -1))
    crash_rank = int(os.environ.get("MNEME_TEST_CRASH_RANK", 0))

    def on_step(step, trainer):
        if step == crash_step and int(os.environ["RANK"]) == crash_rank:
            os._exit(17)

    train(store, run_dir, config["crosscoder"], config["training"], progress=False, on_step=on_step)


if __name__ == "__main__":
    main()
