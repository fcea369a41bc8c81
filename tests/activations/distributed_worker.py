"""One rank of a sharded harvest (launched by torchrun from test_harvest_distributed.py).

Usage: distributed_worker.py OUT_DIR. With MNEME_TEST_CRASH_SHARD set, rank 1 dies (os._exit)
after committing that many shards, like a killed process.
"""

import os
import sys

import torch

from mneme_plugin.activations import harvest
from tests.activations.test_harvest_distributed import harvest_inputs


def main() -> None:
    torch.set_num_threads(1)
    crash_after = int(os.environ.get("MNEME_TEST_CRASH_SHARD", -1))

    def on_shard(index):
        if int(os.environ["RANK"]) == 1 and index + 1 == crash_after:
            os._exit(17)

    base, edited, corpus, config = harvest_inputs()
    harvest(base, edited, corpus, config, sys.argv[1], progress=False, on_shard=on_shard)


if __name__ == "__main__":
    main()
