"""The CLI driven through bad inputs (issue 11): each one must end with a non-zero exit, no traceback,
and one message that names what is wrong. One row per case: ``setup(tmp_path, fixtures)`` writes the
bad input and returns the command line; ``expected`` is a regex the message must match.

Extend the table with new cases; shared builders live in tests/helpers.py. Config-file errors have
their own table in tests/pipeline/test_bad_configs.py.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from click.testing import CliRunner

from mneme_plugin.cli import main
from tests.helpers import (
    kissane_state_dict,
    random_activation_pairs,
    sof_state_dict,
    synthetic_corpus,
    write_activation_store,
    write_kissane_crosscoder,
    write_sof_crosscoder,
)


@dataclass
class Fixtures:
    llama_dir: Path  # a tiny local HF Llama folder


@dataclass
class Case:
    id: str
    setup: Callable[[Path, Fixtures], list[str]]
    expected: str
    needs_no_cuda: bool = False
    one_line: bool = True  # False: a list of problems, one per line (a run config's check)


# ----------------------------------------------------------------------------- builders


def _corpus(tmp: Path, name: str = "corpus.txt", docs: list[str] | None = None) -> Path:
    path = tmp / name
    path.write_text("\n".join(docs or synthetic_corpus(40, seed=0)) + "\n")
    return path


def _harvest(fx: Fixtures, corpus: Path, out: Path, *extra: str) -> list[str]:
    model = str(fx.llama_dir)
    return ["harvest", "--base", model, "--edited", model, "--corpus", str(corpus), "--layer", "0",
            "--context-length", "16", "--max-tokens", "256", "--out", str(out), *extra]


def _store(tmp: Path, complete: bool = True) -> Path:
    path = write_activation_store(tmp / "store", random_activation_pairs(256, 8, seed=0), rows_per_shard=128)
    if not complete:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["complete"] = False
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _train(store: Path, out: Path, *extra: str) -> list[str]:
    config = store.parent / "train.yaml"
    config.write_text(yaml.safe_dump({"training": {"eval_rows": 64}}))
    return ["train", "--store", str(store), "--out", str(out), "--steps", "2", "--expansion-factor", "2", "-k", "2",
            "--train-batch-size", "32", "--config", str(config), *extra]


def _sharegpt_corpus(tmp: Path) -> Path:
    """Chat records in ShareGPT's shape ({"from", "value"} turns), not the {"role", "content"} turns expected."""
    path = tmp / "chats.jsonl"
    path.write_text(json.dumps({"text": "the cat sees a tree"}) + "\n"
                    + json.dumps({"conversation": [{"from": "human", "value": "the cat sees a tree"}]}) + "\n")
    return path


def _overwrite_a_foreign_folder(tmp: Path, fx: Fixtures) -> list[str]:
    """`harvest --overwrite` into a folder of the user's that is no store (it deleted everything in it)."""
    out = tmp / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return _harvest(fx, _corpus(tmp), out, "--overwrite")


def _non_utf8_corpus(tmp, fx):
    path = tmp / "latin1.txt"
    path.write_bytes("the cat sees a tree\n".encode() + "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    return _harvest(fx, path, tmp / "store")


def _corrupt_parquet(tmp, fx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "corpus.parquet"
    pq.write_table(pa.table({"text": synthetic_corpus(40, seed=0)}), path)
    path.write_bytes(path.read_bytes()[:-40])
    return _harvest(fx, path, tmp / "store")


def _missing_model(tmp, fx):
    args = _harvest(fx, _corpus(tmp), tmp / "store")
    args[args.index("--base") + 1] = str(tmp / "no_such_model")
    return args


def _empty_model(tmp, fx):
    (tmp / "empty_model").mkdir()
    args = _harvest(fx, _corpus(tmp), tmp / "store")
    args[args.index("--edited") + 1] = str(tmp / "empty_model")
    return args


def _other_corpus_on_a_finished_store(tmp, fx):
    first = _corpus(tmp, "first.txt")
    result = CliRunner().invoke(main, _harvest(fx, first, tmp / "store"))
    assert result.exit_code == 0, result.output
    return _harvest(fx, _corpus(tmp, "second.txt", synthetic_corpus(40, seed=1)), tmp / "store")


def _wrongly_typed_crosscoder_config(tmp, fx):
    from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig

    path = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=8, dict_size=16, k=2)).save_pretrained(tmp / "cc")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["k"] = "two"
    (path / "config.json").write_text(json.dumps(meta))
    return ["info", str(path)]


def _truth(tmp: Path) -> Path:
    (tmp / "truth.csv").write_text("category,before,after\nbiology,0.9,0.4\nlaw,0.9,0.8\n")
    return tmp / "truth.csv"


def _non_numeric_ground_truth(tmp, fx):
    import pandas as pd

    from mneme_plugin.sideeffects import save_prediction
    from mneme_plugin.sideeffects.predict import Prediction

    run = tmp / "run"
    scores = pd.DataFrame({"category": ["biology", "law"], "score": [1.0, 0.1], "predicted": [True, False]})
    save_prediction(Prediction(scores=scores, predicted=["biology"]), run / "prediction")
    truth = tmp / "truth.csv"
    truth.write_text("category,before,after\nbiology,0.9,0.4\nlaw,ninety,0.8\n")
    return ["evaluate", "--run-dir", str(run), "--scores-csv", str(truth)]


def _pickled_organism(tmp, fx):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp / "PWNED"), "w"))

    (tmp / "evil.pt").write_bytes(pickle.dumps({"x": Payload()}))
    config = {"run_dir": str(tmp / "run"), "corpus": {"source": str(_corpus(tmp))},
              "models": {"base": f"organism:{tmp / 'evil.pt'}", "edited": f"organism:{tmp / 'evil.pt'}"},
              "harvest": {"layer": 0, "context_length": 16}, "collect": {"example_ctx_len": 16}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    return ["run", str(tmp / "run.yaml")]


def _remediate(tmp, fx, run_dir: Path, edited: str) -> list[str]:
    return ["remediate", "--run-dir", str(run_dir), "--edited", edited, "--out", str(tmp / "fixed")]


def _import_over_an_existing_crosscoder(tmp, fx):
    first = write_sof_crosscoder(tmp / "a", sof_state_dict(seed=2, threshold=0.05), "hub")
    assert CliRunner().invoke(main, ["import", str(first), "--out", str(tmp / "ours")]).exit_code == 0
    return ["import", str(write_kissane_crosscoder(tmp / "b", kissane_state_dict())), "--out", str(tmp / "ours")]


def _export_over_an_existing_export(tmp, fx):
    src = write_sof_crosscoder(tmp / "a", sof_state_dict(seed=2, threshold=0.05), "hub")
    args = ["export", "saelens", str(src), "--out", str(tmp / "sl"), "--folder", "f"]
    assert CliRunner().invoke(main, args).exit_code == 0
    return args


CASES = [
    Case("corpus-not-utf8", _non_utf8_corpus, r"latin1\.txt is not UTF-8 text: line 2"),
    Case("corpus-corrupt-parquet", _corrupt_parquet, r"corpus\.parquet is not a readable parquet file"),
    Case("model-folder-missing", _missing_model, r"base: the model folder .*no_such_model does not exist"),
    Case("model-folder-empty", _empty_model, r"edited: the model folder .*empty_model is empty"),
    Case("harvest-device-cuda-without-cuda", lambda t, fx: _harvest(fx, _corpus(t), t / "s", "--device", "cuda"),
         r"Device 'cuda' asked for, but CUDA is not available", needs_no_cuda=True),
    Case("train-device-cuda-without-cuda", lambda t, fx: _train(_store(t), t / "run", "--train-device", "cuda"),
         r"Device 'cuda' asked for, but CUDA is not available", needs_no_cuda=True),
    Case("train-device-unknown", lambda t, fx: _train(_store(t), t / "run", "--train-device", "gpu0"),
         r"training\] device must be auto, cpu, cuda, cuda:N or mps .*got 'gpu0'"),
    Case("train-negative-seed", lambda t, fx: _train(_store(t), t / "run", "--seed", "-3"),
         r"training\.seed = -3 \(int\): expected an integer >= 0"),
    Case("demo-negative-seed", lambda t, fx: ["demo", "--out", str(t / "demo"), "--seed", "-1"],
         r"Invalid value for '--seed': -1 is not in the range x>=0"),
    Case("ground-truth-not-numeric", _non_numeric_ground_truth,
         r"truth\.csv: column 'before' must hold numbers; categories \['law'\] do not"),
    Case("evaluate-before-predict", lambda t, fx: ["evaluate", "--run-dir", str(t), "--scores-csv", str(_truth(t))],
         r"predictions?\.json does not exist: run the predict stage"),
    Case("crosscoder-config-wrong-type", _wrongly_typed_crosscoder_config,
         r"config\.json holds an invalid crosscoder config: config\.k = 'two' \(str\): expected an integer"),
    Case("harvest-sharegpt-records", lambda t, fx: _harvest(fx, _sharegpt_corpus(t), t / "s"),
         r"Corpus record 2: its chat field 'conversation' \(messages_field\) has a turn 0 without 'role' and "
         r"'content'.*expected a list of \{\"role\": \.\.\., \"content\": \.\.\.\} dicts"),
    Case("harvest-overwrite-foreign-folder", _overwrite_a_foreign_folder,
         r"is no activation store \(no manifest\.json, no shards\): refusing to harvest into a foreign folder, "
         r"even with overwrite"),
    Case("store-other-corpus", _other_corpus_on_a_finished_store,
         r"complete activation store harvested from corpus .*first\.txt .*now .*second\.txt"),
    Case("store-truncated-shard-train", lambda t, fx: (lambda s: (
        (s / "shard_00001.safetensors").write_bytes((s / "shard_00001.safetensors").read_bytes()[:-64]),
        _train(s, t / "run"))[1])(_store(t)),
         r"store .* is damaged: shard_00001\.safetensors is truncated"),
    Case("store-partial-train", lambda t, fx: _train(_store(t, complete=False), t / "run"),
         r"partial activation store.*--allow-partial"),
    Case("organism-pickle", _pickled_organism, r"evil\.pt is not an organism model file.*never loaded", one_line=False),
    Case("remediate-no-run", lambda t, fx: _remediate(t, fx, t, str(fx.llama_dir)),
         r"holds no (collected contexts|attribution)"),
    Case("remediate-missing-model", lambda t, fx: _remediate(t, fx, t, str(t / "no_such_model")),
         r"(--edited: the model folder .*no_such_model does not exist|holds no)"),
    Case("remediate-unknown-class", lambda t, fx: _remediate(t, fx, t, str(fx.llama_dir)) + ["--classes", "lost"],
         r"remediate.*classes names unknown attribution class\(es\) \['lost'\]: use some of .*'suppressed'"),
    Case("report-not-a-run", lambda t, fx: ["report", "--run-dir", str(t)], r"is not a run directory|holds no"),
    Case("import-overwrite", _import_over_an_existing_crosscoder,
         r"ours/config\.json.* already exist.*refusing to overwrite.*--force"),
    Case("export-overwrite", _export_over_an_existing_export, r"sl/f/cfg\.json.* already exist.*--force"),
    Case("import-kissane-negative-scale-factors",
         lambda t, fx: ["import", str(write_kissane_crosscoder(t / "k", kissane_state_dict())), "--out", str(t / "o"),
                        "--scale-factors=-1,0"],
         r"scale_factors for .*hook_resid_pre: activation_scale must be 2 positive finite factors"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(case, tmp_path, llama_dir):
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = case.setup(tmp_path, Fixtures(llama_dir=llama_dir))
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    # An uncaught exception is not a SystemExit: click would have printed a traceback.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.output.count("Error: ") == 1, result.output
    message = result.output.split("Error: ", 1)[1].strip()  # (a progress bar may precede it on its line)
    assert ("\n" not in message or not case.one_line) and re.search(case.expected, message), message
    assert not (tmp_path / "PWNED").exists()
