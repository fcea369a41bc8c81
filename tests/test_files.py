"""files.py: atomic writers with unique temporary names, per-folder output locks, refusal to overwrite
(issue 11 item 8)."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from mneme_plugin.errors import OutputExistsError, OutputLockedError
from mneme_plugin.files import (
    LOCK_FILE,
    atomic_directory,
    atomic_write,
    output_lock,
    refuse_overwrite,
    remove_stale_temporaries,
    stat_digest,
)
from tests.helpers import random_activation_pairs, write_activation_store

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = ({"expansion_factor": 2, "k": 2}, {"steps": 3, "batch_size": 32, "warmup_steps": 1, "eval_rows": 64})


def _store(tmp_path: Path) -> Path:
    return write_activation_store(tmp_path / "store", random_activation_pairs(256, 8, seed=0), rows_per_shard=128)


def test_concurrent_writers_of_one_file_never_share_a_temporary(tmp_path):
    """All writers have their temporary open before any renames: shared names made all but one fail."""
    n = 4
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def writer(i):
        def write(tmp):
            tmp.write_text(f"writer {i}")
            barrier.wait(timeout=30)

        try:
            atomic_write(tmp_path / "metrics.json", write)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (tmp_path / "metrics.json").read_text() in {f"writer {i}" for i in range(n)}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_writer_that_fails_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    """A crash while writing (here an exception half-way) must leave what a reader saw before, and nothing else."""
    target = tmp_path / "manifest.json"
    atomic_write(target, lambda tmp: tmp.write_text('{"complete": true}'), durable=True)

    class Stopped(RuntimeError):
        pass

    def half_then_fail(tmp):
        tmp.write_text('{"compl')
        raise Stopped

    for durable in (False, True):
        with pytest.raises(Stopped):
            atomic_write(target, half_then_fail, durable=durable)
        assert target.read_text() == '{"complete": true}'
        assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    with pytest.raises(Stopped):
        atomic_write(tmp_path / "new.json", half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # a new file: nothing at all
    with pytest.raises(Stopped):
        atomic_directory(tmp_path / "model", lambda folder: half_then_fail(folder / "config.json"))
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".shard_00001.{dead.pid}.0123abcd.tmp.safetensors"
    stale_dir = tmp_path / f".crosscoder.{dead.pid}.0123abcd.tmp"
    live = tmp_path / f".shard_00002.{os.getpid()}.0123abcd.tmp.safetensors"
    keep = tmp_path / "shard_00000.safetensors"
    for p in (stale, live, keep):
        p.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "config.json").write_text("{}")
    assert remove_stale_temporaries(tmp_path) == 2
    assert not stale.exists() and not stale_dir.exists() and live.exists() and keep.exists()


def test_atomic_directory_replaces_only_with_overwrite(tmp_path):
    target = tmp_path / "model"
    atomic_directory(target, lambda tmp: (tmp / "a.txt").write_text("1"))
    with pytest.raises(OutputExistsError, match="already exists"):
        atomic_directory(target, lambda tmp: (tmp / "a.txt").write_text("2"))
    atomic_directory(target, lambda tmp: (tmp / "b.txt").write_text("2"), overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old copy left


def test_a_locked_folder_is_refused_at_once_and_freed_when_its_holder_dies(tmp_path, held_lock):
    from mneme_plugin.crosscoder.training import train

    folder, holder = held_lock
    store = _store(tmp_path)
    with pytest.raises(OutputLockedError, match=rf"{folder} is in use by another mneme process \(pid {holder.pid}"):
        train(store, folder, *TRAIN_CONFIGS, progress=False)
    assert not (folder / "train_config.json").exists()
    holder.send_signal(signal.SIGKILL)  # the kernel releases a flock with its process, however it ends
    holder.wait()
    result = train(store, folder, *TRAIN_CONFIGS, progress=False)
    assert result.crosscoder_dir.is_dir() and not (folder / LOCK_FILE).exists()  # removed on release


@pytest.mark.parametrize("command", ["train", "attribute", "run"])
def test_cli_on_a_locked_output_fails_with_one_line(tmp_path, held_lock, command, hub_cache, llama_dir):
    """train --out, attribute --out and run's run_dir are locked (a second job on one folder is refused)."""
    import yaml

    from mneme_plugin.cli import main
    from mneme_plugin.crosscoder.training import train

    folder, holder = held_lock
    store = _store(tmp_path)
    if command == "train":
        args = ["train", "--store", str(store), "--out", str(folder), "--steps", "3", "--expansion-factor", "2",
                "-k", "2"]
    elif command == "attribute":
        cc = train(store, tmp_path / "cc", *TRAIN_CONFIGS, progress=False).crosscoder_dir
        args = ["attribute", "--crosscoder", str(cc), "--store", str(store), "--out", str(folder)]
    else:
        from tests.helpers import hub_cache_repo

        for name in ("org/base", "org/edited"):  # hub ids the run can load (it checks that before the lock)
            hub_cache_repo(hub_cache, name, llama_dir)
        config = {"run_dir": str(folder), "models": {"base": "org/base", "edited": "org/edited"},
                  "corpus": {"source": str(tmp_path / "c.txt")}, "harvest": {"layer": 0}}
        (tmp_path / "c.txt").write_text("some text\n")
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
        args = ["run", str(tmp_path / "run.yaml")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert f"in use by another mneme process (pid {holder.pid}" in result.output


def test_harvest_and_collect_into_a_locked_folder_are_refused(tmp_path, held_lock, ht_pair, corpus):
    from mneme_plugin.activations import HarvestConfig, harvest
    from mneme_plugin.crosscoder.training import train
    from mneme_plugin.interpret import CollectConfig, collect

    folder, _ = held_lock
    cfg = HarvestConfig(layer=0, context_length=16, max_tokens=256)
    with pytest.raises(OutputLockedError, match="in use by another mneme process"):
        harvest(*ht_pair, corpus, cfg, folder, progress=False)
    assert not (folder / "manifest.json").exists()
    store = harvest(*ht_pair, corpus, cfg, tmp_path / "store", progress=False)
    cc = train(store, tmp_path / "cc", *TRAIN_CONFIGS, progress=False).crosscoder
    with pytest.raises(OutputLockedError, match="in use by another mneme process"):
        collect(*ht_pair, cc, corpus, CollectConfig(latents=[0, 1], example_ctx_len=16, harvest=cfg), out_dir=folder,
                progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


def test_one_process_may_nest_locks_on_one_folder(tmp_path):
    """`mneme run` holds its run directory while its stages lock their own folders (and may lock it again)."""
    with output_lock(tmp_path):
        with output_lock(tmp_path):
            pass
        with output_lock(tmp_path / "stage"):
            pass
    with output_lock(tmp_path):  # released on exit
        pass


def test_refuse_overwrite_names_the_existing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    refuse_overwrite([tmp_path / "other.json"], force=False)
    refuse_overwrite([tmp_path / "config.json"], force=True)
    with pytest.raises(OutputExistsError, match=r"config\.json already exists: refusing to overwrite.*--force"):
        refuse_overwrite([tmp_path / "config.json", tmp_path / "model.safetensors"], force=False)


def test_content_digest_reads_small_files_whole_and_large_ones_by_size_and_ends(tmp_path):
    import hashlib

    from mneme_plugin.files import content_digest, file_digest

    small = tmp_path / "small.txt"
    small.write_bytes(b"abc" * 100)
    assert content_digest(small) == file_digest(small) == hashlib.sha256(b"abc" * 100).hexdigest()[:16]
    big = tmp_path / "big.bin"
    data = bytearray(range(256)) * 64  # 16 KiB; "large" here is anything from 4 KiB, sampled 1 KiB at each end
    big.write_bytes(bytes(data))
    digest = lambda: content_digest(big, full_below=4096, sample=1024)
    expected = hashlib.sha256(str(len(data)).encode() + bytes(data[:1024]) + bytes(data[-1024:])).hexdigest()[:16]
    assert digest() == expected
    middle = bytearray(data)
    middle[8000] ^= 1
    big.write_bytes(bytes(middle))
    assert digest() == expected  # the middle is not read: the documented cost of staying cheap
    for changed in (bytes(data[:-1]), bytes(data[:-1]) + b"\x00", b"\x01" + bytes(data[1:])):
        big.write_bytes(changed)
        assert digest() != expected


def test_stat_digest_changes_when_a_file_is_saved_over_and_not_when_read(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "sub" / "config.json").write_text("{}")
    first = stat_digest(folder)
    (folder / "model.safetensors").read_bytes()
    assert stat_digest(folder) == first and stat_digest(tmp_path / "absent") is None
    # The same size saved over it a second later: only the time tells, and it does.
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    (folder / "model.safetensors").write_bytes(b"\1" * 64)
    os.utime(folder / "model.safetensors", ns=(stamp + 1_000_000_000, stamp + 1_000_000_000))
    assert stat_digest(folder) != first
    # A new file in a subfolder counts too; a lone file has its own digest.
    second = stat_digest(folder)
    (folder / "sub" / "tokenizer.json").write_text("{}")
    assert stat_digest(folder) != second
    assert stat_digest(folder / "sub" / "config.json") is not None


def test_corrupt_stage_json_is_a_one_line_error_that_says_what_to_redo(tmp_path):
    """A JSON file cut by a crash: every reader says which file and what to run again (no traceback)."""
    import json

    from mneme_plugin.errors import CheckpointError
    from mneme_plugin.files import read_json
    from mneme_plugin.interpret.contexts import load_reference_latents
    from mneme_plugin.sideeffects.evaluate import load_evaluation

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": [1, 2]}))
    assert read_json(good, "redo") == {"a": [1, 2]}
    for folder, name, load, remedy in ((tmp_path / "evaluation", "evaluation.json", load_evaluation, "evaluate again"),
                                       (tmp_path / "contexts", "contexts.json", load_reference_latents, "collect again")):
        folder.mkdir()
        (folder / name).write_text('{"x":')
        with pytest.raises(CheckpointError, match=rf"{name} is corrupt: not valid JSON .*{remedy}"):
            load(folder)
    from mneme_plugin.crosscoder.training import load_training_metrics

    (tmp_path / "metrics.json").write_text('{"x":')
    with pytest.raises(CheckpointError, match=r"metrics.json is corrupt: not valid JSON .*train again"):
        load_training_metrics(tmp_path)


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """safetensors creates 0600 files; ours are readable as any file the process creates (shared disks)."""
    import torch
    from safetensors.torch import save_file

    from mneme_plugin.files import atomic_directory, atomic_write

    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    written = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    assert (written.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)
    # A folder written by a library (HF save_pretrained goes through safetensors too).
    folder = atomic_directory(tmp_path / "model", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp / "m.safetensors")))
    assert ((folder / "m.safetensors").stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777)
