"""The torchrun launcher helpers of mneme_plugin.distributed."""

import sys

import pytest

from mneme_plugin.distributed import SINGLE_PROCESS, strip_option, torchrun_command
from tests.helpers import free_port


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


def _rank_outcomes(rank: int, world: int, port: int, locked: str, free: str, out: str) -> None:
    """One gloo rank: what main_rank_lock and on_main give it, written to OUT/rankR.json."""
    import json
    import os

    import torch.distributed as dist

    from mneme_plugin.distributed import DistributedContext, main_rank_lock
    from mneme_plugin.errors import MnemeError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistributedContext(rank, world)
    seen = {}

    def attempt(name, fn):
        try:
            seen[name] = ["ok", fn()]
        except (MnemeError, ZeroDivisionError) as err:
            seen[name] = [type(err).__name__, str(err)]

    def hold(folder):
        with main_rank_lock(ctx, folder, "test folder"):
            ctx.barrier()  # every rank looks while rank 0 holds it
            held = os.path.exists(os.path.join(folder, ".mneme.lock"))
            ctx.barrier()
            return held

    attempt("locked", lambda: hold(locked))
    attempt("free", lambda: hold(free))
    attempt("fails", lambda: ctx.on_main(lambda: 1 / 0))
    attempt("value", lambda: ctx.on_main(lambda: {"from": rank}))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


def test_rank_zero_decides_for_every_rank_under_two_gloo_ranks(tmp_path, held_lock):
    """A folder another process has locked stops both ranks; an error on rank 0 reaches rank 1."""
    import json

    import torch.multiprocessing as mp

    from mneme_plugin.files import LOCK_FILE

    assert LOCK_FILE == ".mneme.lock"
    locked, free = held_lock[0], tmp_path / "free"
    # fork: the ranks start from this process (torch imported once), in well under a second
    mp.start_processes(_rank_outcomes, args=(2, free_port(), str(locked), str(free), str(tmp_path)),
                       nprocs=2, start_method="fork")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["locked"][0] == rank1["locked"][0] == "OutputLockedError"
    assert rank1["locked"][1] == rank0["locked"][1] and "in use by another mneme process" in rank1["locked"][1]
    assert rank0["free"] == rank1["free"] == ["ok", True]  # held (by rank 0) for every rank's block
    assert not (free / LOCK_FILE).exists()  # released at the end of the block
    assert rank0["fails"][0] == "ZeroDivisionError" and rank1["fails"][0] == "RankFailedError"
    assert "ZeroDivisionError" in rank1["fails"][1]
    assert rank0["value"] == rank1["value"] == ["ok", {"from": 0}]


def _join_and_report(rank: int, out: str) -> None:
    import json
    import os

    from mneme_plugin.distributed import distributed_context
    from mneme_plugin.errors import MnemeError

    try:
        distributed_context("cpu")
        outcome = ["joined", ""]
    except MnemeError as err:
        outcome = [type(err).__name__, str(err)]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)


def test_a_rank_that_never_arrives_stops_the_others_after_the_init_timeout(tmp_path, monkeypatch):
    """Rank 1 of 2 never starts: rank 0 stops with an error saying what to check, after
    MNEME_DIST_INIT_TIMEOUT seconds (torch alone waits 30 minutes)."""
    import json

    from tests.helpers import fork_ranks

    monkeypatch.setenv("MNEME_DIST_INIT_TIMEOUT", "2")
    fork_ranks(_join_and_report, 2, str(tmp_path), started=1)
    kind, message = json.loads((tmp_path / "rank0.json").read_text())
    assert kind == "RankFailedError"
    assert "Rank 0 waited 2 s for the other ranks of the job (2 in all" in message
    assert "same torchrun command" in message and "MNEME_DIST_INIT_TIMEOUT" in message


def test_a_bad_init_timeout_is_refused(monkeypatch):
    import pytest

    from mneme_plugin.distributed import init_timeout_s
    from mneme_plugin.errors import ConfigError

    assert init_timeout_s() == 600
    monkeypatch.setenv("MNEME_DIST_INIT_TIMEOUT", "ten")
    with pytest.raises(ConfigError, match="MNEME_DIST_INIT_TIMEOUT='ten'"):
        init_timeout_s()


@pytest.mark.parametrize("kind, message", [
    ("ours", "ConfigError: shard 7 of the store cannot be read on this node: copy the store again"),
    ("other", "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB (planted)"),
])
def test_a_failing_rank_is_torchruns_root_cause_with_its_error(kind, message):
    """Rank 1 fails while rank 0 waits for it in a collective: torchrun's summary named rank 1 with
    `error_file: <N/A>` and no error (the one-line error of ours, or an out-of-memory, was only in the
    interleaved output, beside rank 0's gloo / NCCL error). Under `run_recorded` (the `mneme` entry
    point) the summary's root cause carries the failing rank's error and traceback."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tests.failing_ranks", kind], cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    summary = (run.stdout + run.stderr).split("Root Cause (first observed failure):")[-1]
    assert "rank      : 1 (local_rank: 1)" in summary and "error_file: <N/A>" not in summary, summary
    assert message in summary, summary
