"""One rank of a sharded harvest (launched by torchrun from test_harvest_distributed.py).

Usage: distributed_worker.py OUT_DIR [stream | train-stream]. With MNEME_TEST_CRASH_SHARD set, rank 1
dies (os._exit) after committing that many shards, like a killed process. With ``stream`` each rank
reads its share of a harvest stream instead and saves its batches to OUT_DIR/rankR.pt; with
``train-stream`` the ranks train a crosscoder on the stream into OUT_DIR (resuming what is there).
"""

import os
import sys

import torch

from mneme_plugin.activations import harvest, harvest_stream
from mneme_plugin.distributed import distributed_context
from tests.activations.test_harvest_distributed import STREAM_BATCH, harvest_inputs, train_on_stream


def main() -> None:
    torch.set_num_threads(1)
    crash_after = int(os.environ.get("MNEME_TEST_CRASH_SHARD", -1))

    def on_shard(index):
        if int(os.environ["RANK"]) == 1 and index + 1 == crash_after:
            os._exit(17)

    base, edited, corpus, config = harvest_inputs()
    if sys.argv[2:] == ["stream"]:
        dist = distributed_context("cpu")
        stream = harvest_stream(base, edited, corpus, config, batch_size=STREAM_BATCH, shuffle_buffer_rows=64,
                                dist=dist)
        torch.save({"batches": list(stream), "scale_factors": stream.scale_factors,
                    "outliers_dropped": stream.outliers_dropped}, f"{sys.argv[1]}/rank{dist.rank}.pt")
        return
    if sys.argv[2:] == ["train-stream"]:
        train_on_stream(sys.argv[1], distributed_context("cpu"))
        return
    harvest(base, edited, corpus, config, sys.argv[1], progress=False, on_shard=on_shard)


if __name__ == "__main__":
    main()
