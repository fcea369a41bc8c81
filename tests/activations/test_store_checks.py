"""Partial and damaged stores are said to be so, and used only when asked (issue 11 item 7)."""

import json
import logging

import pytest
from click.testing import CliRunner

from mneme_plugin.activations import ActivationStore
from mneme_plugin.attribution import attribute
from mneme_plugin.cli import main
from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig
from mneme_plugin.crosscoder.training import train
from mneme_plugin.errors import CheckpointError
from tests.helpers import random_activation_pairs, write_activation_store

TRAIN = ({"expansion_factor": 2, "k": 2}, {"steps": 2, "batch_size": 32, "warmup_steps": 1, "eval_rows": 64})


def _partial_store(folder):
    """A store as a killed harvest leaves it: 2 committed shards, complete false."""
    path = write_activation_store(folder, random_activation_pairs(256, 8, seed=0), rows_per_shard=128)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(complete=False, n_windows=2)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_train_refuses_a_partial_store_unless_allowed(tmp_path, caplog):
    store = _partial_store(tmp_path / "store")
    with pytest.raises(CheckpointError, match=r"partial activation store: its harvest stopped after 256 rows.*"
                                              r"--allow-partial"):
        train(store, tmp_path / "run", *TRAIN, progress=False)
    assert not (tmp_path / "run" / "crosscoder").exists()
    with caplog.at_level(logging.WARNING, logger="mneme_plugin"):
        result = train(store, tmp_path / "run", *TRAIN, progress=False, allow_partial=True)
    assert result.crosscoder_dir.is_dir() and "partial activation store" in caplog.text


def test_attribute_refuses_a_partial_store_unless_allowed(tmp_path):
    store = _partial_store(tmp_path / "store")
    cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=8, dict_size=16, k=2))
    with pytest.raises(CheckpointError, match=r"partial activation store.*before attribution"):
        attribute(cc, store, {"device": "cpu"}, progress=False)
    assert attribute(cc, store, {"device": "cpu"}, progress=False, allow_partial=True).table.shape[0] == 16


def test_cli_train_and_attribute_on_a_partial_store(tmp_path):
    store = _partial_store(tmp_path / "store")
    (tmp_path / "train.yaml").write_text(json.dumps({"training": {"eval_rows": 64}}))  # JSON is YAML
    args = ["train", "--store", str(store), "--out", str(tmp_path / "run"), "--steps", "2", "--expansion-factor", "2",
            "-k", "2", "--train-batch-size", "32", "--config", str(tmp_path / "train.yaml")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "partial activation store" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, args + ["--allow-partial"])
    assert result.exit_code == 0, result.output


def test_info_calls_a_store_with_a_truncated_shard_corrupt(tmp_path):
    path = write_activation_store(tmp_path / "store", random_activation_pairs(256, 8, seed=0), rows_per_shard=128)
    assert "(complete)" in CliRunner().invoke(main, ["info", str(path)]).output
    shard = path / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert ActivationStore(path).shard_problems() == [
        f"shard_00001.safetensors is truncated ({shard.stat().st_size:,} of {shard.stat().st_size + 100:,} bytes)"]
    result = CliRunner().invoke(main, ["info", str(path)])
    assert "DAMAGED: shard_00001.safetensors is truncated" in result.output and "(complete)" not in result.output
    shard.unlink()
    assert "shard_00001.safetensors is missing" in CliRunner().invoke(main, ["info", str(path)]).output


def test_info_calls_a_killed_harvest_partial(tmp_path):
    result = CliRunner().invoke(main, ["info", str(_partial_store(tmp_path / "store"))])
    assert "PARTIAL: resume the harvest" in result.output


def test_a_damaged_store_is_refused_up_front_even_when_partial_use_is_allowed(tmp_path):
    path = write_activation_store(tmp_path / "store", random_activation_pairs(256, 8, seed=0), rows_per_shard=128)
    shard = path / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=r"store .* is damaged: shard_00000\.safetensors is truncated"):
        train(path, tmp_path / "run", *TRAIN, progress=False, allow_partial=True)
    assert not (tmp_path / "run").exists()  # checked before the run directory is locked / created


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["shards"][0].pop("n_rows"), r"shards\[0\] is .*expected"),
    (lambda m: m["shards"][1].update(n_rows="many"), r"shards\[1\] is .*'many'"),
    (lambda m: m.update(shards={"x": 1}), r"shards is a dict, expected a list"),
    (lambda m: m.update(d_model="eight"), r"d_model is 'eight'"),
    (lambda m: m["normalization"].pop("scale_factors"), r"normalization\.scale_factors is missing"),
    (lambda m: m.update(normalization=None), r"normalization\.scale_factors is missing"),
])
def test_manifest_entries_of_the_wrong_type_name_the_file(tmp_path, edit, expected):
    import json

    from mneme_plugin.activations.store import ActivationStore
    from mneme_plugin.errors import CheckpointError
    from tests.helpers import random_activation_pairs, write_activation_store

    store = write_activation_store(tmp_path / "store", random_activation_pairs(64, 4, seed=0), rows_per_shard=32)
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest\.json is corrupt: " + expected):
        ActivationStore(store).scale_factors


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_a_manifest_naming_a_shard_outside_the_store_is_refused(tmp_path, name):
    """A shard entry is a file inside the store: a manifest pointing at ``../x`` or an absolute path
    (a hand-edited or foreign manifest) would read (and `info` would stat) files anywhere."""
    outside = write_activation_store(tmp_path / "other", random_activation_pairs(32, 4, seed=1), rows_per_shard=32)
    store = write_activation_store(tmp_path / "store", random_activation_pairs(64, 4, seed=0), rows_per_shard=32)
    (tmp_path / "outside.safetensors").write_bytes((outside / "shard_00000.safetensors").read_bytes())
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][1]["file"] = str(tmp_path / "outside.safetensors") if name == "ABSOLUTE" else name
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest\.json is corrupt: shards\[1\] names .*outside\.safetensors"
                                              r".*outside the store"):
        ActivationStore(store)
    result = CliRunner().invoke(main, ["info", str(store)])
    assert "outside the store" in result.output and "Traceback" not in result.output


def test_a_rank_progress_file_naming_a_shard_outside_the_store_is_refused(tmp_path):
    from mneme_plugin.activations.sharded import _rank_progress, rank_manifest_name

    store = tmp_path / "store"
    store.mkdir()
    (store / rank_manifest_name(1)).write_text(json.dumps({
        "rank": 1, "shards": [{"file": "../x.safetensors", "n_rows": 4, "windows_end": 1, "windows_start": 0}],
        "next_batch": 1, "done": False, "outliers_dropped": 0, "special_tokens_dropped": 0, "padding_dropped": 0,
        "n_corpus_tokens": 4}))
    with pytest.raises(CheckpointError, match=r"manifest\.rank001\.json is corrupt: shards\[0\] names "
                                              r"'\.\./x\.safetensors', outside the store"):
        _rank_progress(store, 1)
