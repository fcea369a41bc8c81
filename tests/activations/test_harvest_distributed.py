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
    # overwrite deletes a store's files only: a folder without a store is refused all the same, nothing deleted.
    with pytest.raises(ForeignOutputError, match="foreign folder, even with overwrite"):
        _prepare(None, [], HarvestConfig(layer=1), foreign, world_size=2, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "hi"


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


# ------------------------------------------------------------------ a fold (another number of ranks) cut short


def fold_inputs():
    """``harvest_inputs`` with small batches and shards: many batches per rank, several shards each."""
    base, edited, _, config = harvest_inputs()
    return base, edited, synthetic_corpus(60, seed=0), config.replace(batch_size=3, rows_per_shard=40)


class _Stopped(RuntimeError):
    pass


def _fold_rank(rank: int, out: str, stop_rank_1_after: int | None, crash: str | None) -> None:
    """One forked rank of a harvest of ``fold_inputs`` into ``out``. ``stop_rank_1_after``: rank 1 raises
    after committing that many shards. ``crash``: rank 0 dies (``os._exit``, a killed process) in the fold
    of the store to this number of ranks: "before_manifest" (the new manifest unwritten), "after_manifest"
    (written, no old progress file removed) or "during_removal" (one of them removed)."""
    from mneme_plugin.activations import sharded

    base, edited, corpus, config = fold_inputs()
    if rank == 0 and crash in ("before_manifest", "after_manifest"):
        write = sharded.write_manifest

        def dying_write(path, manifest):
            if crash == "after_manifest":
                write(path, manifest)
            os._exit(9)

        sharded.write_manifest = dying_write  # the fold's is the first manifest a resume writes
    if rank == 0 and crash == "during_removal":
        unlink, removed = Path.unlink, []

        def dying_unlink(self, *args, **kwargs):
            if self.name.startswith("manifest.rank"):
                if removed:
                    os._exit(9)
                removed.append(self.name)
            return unlink(self, *args, **kwargs)

        Path.unlink = dying_unlink

    def on_shard(index):
        if rank == 1 and index + 1 == stop_rank_1_after:
            raise _Stopped

    try:
        harvest(base, edited, corpus, config, out, progress=False, on_shard=on_shard)
    except (_Stopped, RuntimeError):  # the stopped rank, and the other told of it
        pass


@pytest.fixture(scope="module")
def fold_stores(tmp_path_factory):
    """(one process's store of ``fold_inputs``, a partial store of two ranks: rank 1 stopped after two shards)."""
    root = tmp_path_factory.mktemp("fold")
    base, edited, corpus, config = fold_inputs()
    one = harvest(base, edited, corpus, config, root / "one", progress=False)
    fork_ranks(_fold_rank, 2, str(root / "partial"), 2, None)
    partial = ActivationStore(root / "partial")
    assert not partial.complete and len(list((root / "partial").glob("manifest.rank*.json"))) == 2
    return one, root / "partial"


@pytest.mark.parametrize("crash", ["before_manifest", "after_manifest", "during_removal"])
def test_a_fold_cut_short_resumes_to_the_rows_of_one_process(fold_stores, tmp_path, crash):
    """Rank 0 killed while folding a 2-rank partial store for 3 ranks; 3 ranks, 2 ranks or one process
    resume it. It used to write the new manifest, then remove the old ranks' progress files: killed in
    between, the resume read them as its own (old shards listed twice, batches of the new split taken for
    done, their rows never harvested) and ended complete with duplicated and missing rows."""
    import shutil

    import torch.multiprocessing as mp

    one, partial = fold_stores
    crashed = tmp_path / "crashed"
    shutil.copytree(partial, crashed)
    with pytest.raises(mp.ProcessExitedException):
        fork_ranks(_fold_rank, 3, str(crashed), None, crash)
    manifest = json.loads((crashed / "manifest.json").read_text())
    assert not manifest["complete"]
    assert manifest["world_size"] == (2 if crash == "before_manifest" else 3)
    assert len(list(crashed.glob("manifest.rank*.json"))) == (1 if crash == "during_removal" else 2)

    for resume_world in (3, 2, 1):
        out = tmp_path / f"resumed_{resume_world}"
        shutil.copytree(crashed, out)
        if resume_world == 1:
            base, edited, corpus, config = fold_inputs()
            done = harvest(base, edited, corpus, config, out, progress=False)
        else:
            fork_ranks(_fold_rank, resume_world, str(out), None, None)
            done = ActivationStore(out)
        files = [entry["file"] for entry in done.manifest["shards"]]
        assert len(files) == len(set(files)), (resume_world, files)
        assert done.num_rows == one.num_rows, resume_world
        assert_same_rows(done, one)
        assert not list(out.glob("manifest.rank*.json"))


def _without_generation(folder: Path) -> None:
    """Rewrite ``folder``'s progress files as mneme wrote them before they recorded their generation."""
    for file in folder.glob("manifest.rank*.json"):
        state = json.loads(file.read_text())
        state.pop("generation", None)
        file.write_text(json.dumps(state))


def test_progress_files_that_do_not_record_their_generation_still_resume(fold_stores, tmp_path):
    """A partial store of an earlier mneme (progress files without a generation) resumes from its progress;
    one it left in a fold cut short (the old progress files still there) resumes without them."""
    import shutil

    from mneme_plugin.activations import sharded
    from mneme_plugin.activations.manifest import read_manifest

    one, partial = fold_stores
    base, edited, corpus, config = fold_inputs()
    old = tmp_path / "old"
    shutil.copytree(partial, old)
    _without_generation(old)
    done = harvest(base, edited, corpus, config, old, progress=False)  # one process: folds the two ranks' progress
    assert_same_rows(done, one)
    files = {entry["file"] for entry in done.manifest["shards"]}
    assert {"rank000_shard_00000.safetensors", "rank001_shard_00001.safetensors"} <= files  # their progress kept

    cut = tmp_path / "cut"
    shutil.copytree(partial, cut)
    with pytest.MonkeyPatch.context() as patch:  # a fold killed before it removed the old progress files
        patch.setattr(sharded, "_remove_progress_files", lambda path: None)
        sharded._fold(cut, read_manifest(cut), 3)
    _without_generation(cut)
    # and one listing no shard, whose generation its shards cannot tell: taken as its own, rank 2 would skip
    # every batch of the new split
    (cut / rank_manifest_name(2)).write_text(json.dumps({
        "rank": 2, "shards": [], "next_batch": 10_000, "done": True, "windows_end": 0,
        **dict.fromkeys(sharded.COUNT_KEYS, 0)}))
    fork_ranks(_fold_rank, 3, str(cut), None, None)
    done = ActivationStore(cut)
    assert_same_rows(done, one)
    assert not list(cut.glob("manifest.rank*.json"))


def test_a_merge_that_would_list_a_shard_twice_is_refused(fold_stores, tmp_path):
    import shutil

    from mneme_plugin.activations import sharded
    from mneme_plugin.activations.manifest import read_manifest
    from mneme_plugin.errors import CheckpointError

    _, partial = fold_stores
    out = tmp_path / "store"
    shutil.copytree(partial, out)
    sharded._fold(out, read_manifest(out), 2)
    manifest = read_manifest(out)
    carried = manifest["carried"]["shards"][0]
    for rank in range(2):  # rank 0's progress lists a shard the manifest already carries
        (out / rank_manifest_name(rank)).write_text(json.dumps({
            "rank": rank, "generation": manifest["generation"], "shards": [carried] if rank == 0 else [],
            "next_batch": 10_000, "done": True, "windows_end": 0, **dict.fromkeys(sharded.COUNT_KEYS, 0)}))
    with pytest.raises(CheckpointError, match=f"lists the shards \\['{carried['file']}'\\] twice"):
        sharded._merge(out, manifest, 2)
    assert not read_manifest(out)["complete"]
