"""Sharded harvest under torchrun (2 gloo ranks on CPU): the rows of one process, resumable per rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mneme_plugin.activations import ActivationStore, HarvestConfig, harvest, harvest_stream
from mneme_plugin.activations.sharded import rank_manifest_name
from tests.helpers import fork_ranks, make_hooked_transformer, make_tokenizer, synthetic_corpus

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
COUNTS = ("n_tokens", "n_windows", "n_corpus_tokens", "outliers_dropped", "special_tokens_dropped", "padding_dropped")


def harvest_inputs():
    """Models, corpus and config, built the same way in every process (seeded, local)."""
    tokenizer = make_tokenizer()
    base = make_hooked_transformer(tokenizer, n_layers=2, d_model=32, seed=0)
    edited = make_hooked_transformer(tokenizer, n_layers=2, d_model=32, seed=1)
    config = HarvestConfig(layer=1, context_length=16, batch_size=4, rows_per_shard=100,
                           normalization_tokens=300, dtype="float32", outlier_factor=1.2)
    return base, edited, synthetic_corpus(120, seed=0), config


STREAM_BATCH = 8  # the global batch of the streamed test


def torchrun(out_dir: Path, crash_after_shards: int | None = None, *mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if crash_after_shards is not None:
        env["MNEME_TEST_CRASH_SHARD"] = str(crash_after_shards)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), str(out_dir), *mode]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def rows_by_position(store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shards = [store.load_shard(i) for i in range(store.num_shards)]
    windows = torch.cat([s["windows"] for s in shards]).long()
    positions = torch.cat([s["positions"] for s in shards]).long()
    key = windows * 10_000 + positions
    order = key.argsort()
    tokens = torch.cat([s["tokens"] for s in shards]).long()
    acts = torch.cat([s["activations"] for s in shards])
    return key[order], tokens[order], acts[order]


@pytest.mark.slow  # torchrun: a minute or more on 2 cores
def test_two_ranks_harvest_the_rows_of_one_process_and_a_killed_rank_resumes(tmp_path):
    base, edited, corpus, config = harvest_inputs()
    one = harvest(base, edited, corpus, config, tmp_path / "one", progress=False)

    out = tmp_path / "two"
    crashed = torchrun(out, crash_after_shards=2)
    assert crashed.returncode != 0
    partial = ActivationStore(out)
    assert not partial.complete and partial.num_shards == 0  # shards are listed only once all ranks are done
    assert (out / rank_manifest_name(1)).is_file()
    assert any(out.glob("rank001_shard_*.safetensors"))

    done = torchrun(out)
    assert done.returncode == 0, done.stderr[-3000:]
    two = ActivationStore(out)
    assert two.complete and not list(out.glob("manifest.rank*"))
    assert {entry["file"][:7] for entry in two.manifest["shards"]} == {"rank000", "rank001"}
    assert_same_rows(two, one)
    assert one.manifest["outliers_dropped"] > 0  # the shared normalisation thresholds are exercised


def assert_same_rows(got: ActivationStore, expected: ActivationStore) -> None:
    """The same rows (by window and position), counts and normalisation, however they are sharded."""
    assert got.complete
    for key in COUNTS:
        assert got.manifest[key] == expected.manifest[key], key
    assert got.manifest["normalization"] == expected.manifest["normalization"]
    key_1, tokens_1, acts_1 = rows_by_position(expected)
    key_2, tokens_2, acts_2 = rows_by_position(got)
    assert torch.equal(key_1, key_2) and torch.equal(tokens_1, tokens_2)
    torch.testing.assert_close(acts_2, acts_1, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # torchrun twice: a minute or more on 2 cores
def test_a_partial_harvest_resumes_on_another_number_of_processes(tmp_path):
    base, edited, corpus, config = harvest_inputs()
    one = harvest(base, edited, corpus, config, tmp_path / "one", progress=False)

    two_then_one = tmp_path / "two_then_one"
    assert torchrun(two_then_one, crash_after_shards=2).returncode != 0  # rank 1 killed after 2 shards
    done = harvest(base, edited, corpus, config, two_then_one, progress=False)  # one process finishes
    assert_same_rows(done, one)
    assert not list(two_then_one.glob("manifest.rank*"))
    files = {entry["file"] for entry in done.manifest["shards"]}
    assert any(f.startswith("rank001_") for f in files) and any(f.startswith("g01_rank000_") for f in files)

    class Stopped(RuntimeError):
        pass

    def stop_after_two(index):
        if index == 1:
            raise Stopped

    one_then_two = tmp_path / "one_then_two"
    with pytest.raises(Stopped):  # one process, stopped after 2 shards
        harvest(base, edited, corpus, config, one_then_two, progress=False, on_shard=stop_after_two)
    resumed = torchrun(one_then_two)  # two ranks share the batches still to do
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = ActivationStore(one_then_two)
    assert_same_rows(done, one)
    files = [entry["file"] for entry in done.manifest["shards"]]
    assert files[:2] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert {f[:11] for f in files[2:]} == {"g01_rank000", "g01_rank001"}


@pytest.mark.slow  # torchrun: a minute or more on 2 cores
def test_two_ranks_stream_their_shares_of_the_one_process_stream(tmp_path):
    base, edited, corpus, config = harvest_inputs()
    one = harvest_stream(base, edited, corpus, config, batch_size=STREAM_BATCH, shuffle_buffer_rows=64)
    expected = list(one)
    done = torchrun(tmp_path, None, "stream")
    assert done.returncode == 0, done.stderr[-3000:]
    parts = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert one.outliers_dropped > 0  # the shared normalisation thresholds are exercised
    half = STREAM_BATCH // 2
    for rank, part in enumerate(parts):
        torch.testing.assert_close(part["scale_factors"], one.scale_factors)
        assert part["outliers_dropped"] == one.outliers_dropped
        # Rank r's batch j is the r-th half of one process's global batch j, for every batch.
        assert len(part["batches"]) == len(expected)
        for got, whole in zip(part["batches"], expected):
            torch.testing.assert_close(got, whole[rank * half : (rank + 1) * half], rtol=1e-5, atol=1e-5)


STREAM_TRAINING = {"steps": 12, "batch_size": STREAM_BATCH, "lr": 3e-3, "warmup_steps": 2, "threshold_start_step": 2,
                   "dead_after_tokens": 40, "checkpoint_every": 4, "eval_rows": 16, "device": "cpu"}


def train_on_stream(run_dir, dist, on_step=None):
    """A crosscoder trained on the harvest stream of ``harvest_inputs`` (this rank's share under ``dist``)."""
    from mneme_plugin.crosscoder.training import train

    base, edited, corpus, config = harvest_inputs()
    stream = harvest_stream(base, edited, corpus, config, batch_size=STREAM_BATCH, shuffle_buffer_rows=64,
                            dist=dist)
    return train(stream, run_dir, {"expansion_factor": 2, "k": 4}, STREAM_TRAINING, progress=False,
                 on_step=on_step)


@pytest.mark.slow  # torchrun: a minute or more on 2 cores
def test_a_streamed_run_resumes_on_another_number_of_ranks(tmp_path):
    from mneme_plugin.distributed import SINGLE_PROCESS

    reference = train_on_stream(tmp_path / "one", SINGLE_PROCESS).crosscoder.state_dict()

    class Killed(RuntimeError):
        pass

    def kill_at_6(step, trainer):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):  # one process, stopped after its checkpoint at step 4
        train_on_stream(tmp_path / "resumed", SINGLE_PROCESS, on_step=kill_at_6)
    done = torchrun(tmp_path / "resumed", None, "train-stream")  # two ranks replay the stream to step 4
    assert done.returncode == 0, done.stderr[-3000:]
    from mneme_plugin.crosscoder import BatchTopKCrossCoder

    resumed = BatchTopKCrossCoder.from_pretrained(tmp_path / "resumed" / "crosscoder").state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_rank_0_refuses_a_foreign_folder_with_an_error_every_rank_can_raise(tmp_path):
    """Rank 0 prepares the store and broadcasts its error (pickled) to the other ranks: the type and
    the folder `mneme run` matches must survive the trip."""
    import pickle

    from mneme_plugin.activations.sharded import _prepare
    from mneme_plugin.errors import CheckpointError, ForeignOutputError

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    with pytest.raises(ForeignOutputError, match="foreign folder") as refused:
        _prepare(None, [], HarvestConfig(layer=1), foreign, world_size=2, overwrite=False)
    received = pickle.loads(pickle.dumps(refused.value))
    assert type(received) is ForeignOutputError and isinstance(received, CheckpointError)
    assert received.folder == foreign and str(received) == str(refused.value)


def _harvest_rank_1_failing(rank: int, out: str) -> None:
    """One forked rank of a sharded harvest whose rank 1 fails writing its first shard (a full disk);
    what each rank raised goes to OUT/rankR.json."""
    base, edited, corpus, config = harvest_inputs()

    def disk_full(index):
        if rank == 1:
            raise OSError(28, "No space left on device")

    try:
        harvest(base, edited, corpus, config, Path(out) / "store", progress=False, on_shard=disk_full)
        outcome = ["ok", ""]
    except Exception as err:  # noqa: BLE001 - the test reads which error each rank got
        outcome = [type(err).__name__, str(err)]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_an_error_on_one_rank_of_a_harvest_reaches_the_other_with_the_rank_and_its_message(tmp_path):
    """Not a gloo "Connection closed by peer" on rank 0, but rank 1's own error, named."""
    fork_ranks(_harvest_rank_1_failing, 2, str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2))
    assert rank1 == ["OSError", "[Errno 28] No space left on device"]
    assert rank0 == ["RankFailedError", "Rank 1 failed while harvesting: OSError: [Errno 28] No space left on device"]
    assert not ActivationStore(tmp_path / "store").complete  # run again to resume


def _harvest_into_own_folder(rank: int, out: str) -> None:
    """One forked rank harvesting into ``OUT/node<rank>/store``: ranks on nodes without a shared filesystem."""
    base, edited, corpus, config = harvest_inputs()
    try:
        harvest(base, edited, corpus, config, Path(out) / f"node{rank}" / "store", progress=False)
        outcome = ["ok", ""]
    except Exception as err:  # noqa: BLE001 - the test reads which error each rank got
        outcome = [type(err).__name__, str(err)]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_ranks_harvesting_into_folders_rank_0_cannot_see_are_told_to_share_one(tmp_path):
    """Each node wrote its shards to its own disk and the merge said "did not finish; run it again to resume",
    which cannot help: the error now says every rank must write to one folder all of them see."""
    fork_ranks(_harvest_into_own_folder, 2, str(tmp_path))
    for rank in range(2):
        kind, message = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "must write to one folder that all of them see" in message, (rank, kind, message)
    assert "Ranks [1] finished their share" in json.loads((tmp_path / "rank0.json").read_text())[1]
    assert not (tmp_path / "node0" / "store" / "manifest.json").exists() or \
        not ActivationStore(tmp_path / "node0" / "store").complete
