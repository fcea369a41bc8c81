"""The torchrun launcher helpers of mneme_plugin.distributed."""

import sys

from mneme_plugin.distributed import SINGLE_PROCESS, strip_option, torchrun_command


def test_relaunch_drops_nproc_and_keeps_every_other_argument():
    argv = ["train", "--store", "s", "--nproc", "4", "--out", "r", "--nproc=2", "--steps", "3"]
    assert strip_option(argv, "--nproc") == ["train", "--store", "s", "--out", "r", "--steps", "3"]
    cmd = torchrun_command(4, "mneme_plugin.cli", ["train"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in cmd and cmd[-3:] == ["-m", "mneme_plugin.cli", "train"]


def test_single_process_collectives_are_the_identity():
    import torch

    t = torch.arange(3.0)
    assert SINGLE_PROCESS.all_sum(t) is t and torch.equal(SINGLE_PROCESS.all_gather(t), t[None])
    assert SINGLE_PROCESS.broadcast_object({"a": 1}) == {"a": 1} and SINGLE_PROCESS.is_main
