"""The command line end to end on tiny local HF models (no network)."""

import json

import pytest
from click.testing import CliRunner

from mneme_plugin.cli import main
from tests.helpers import save_finetuned_llama, synthetic_corpus


@pytest.fixture(scope="module")
def llama_pair_dirs(llama_dir, tmp_path_factory):
    edited = save_finetuned_llama(llama_dir, tmp_path_factory.mktemp("edited_llama"), synthetic_corpus(40, seed=3))
    return llama_dir, edited


def _invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def test_every_command_has_help():
    for command in ([], ["harvest"], ["train"], ["info"]):
        result = _invoke(command + ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_harvest_train_info_from_the_command_line(llama_pair_dirs, tmp_path):
    base, edited = llama_pair_dirs
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_corpus(150, seed=5)))
    store = tmp_path / "store"
    result = _invoke(["harvest", "--base", str(base), "--edited", str(edited), "--corpus", str(corpus),
                      "--layer", "1", "--context-length", "32", "--out", str(store)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["hook_name"] == "blocks.1.hook_resid_post"

    config = tmp_path / "train.yaml"
    config.write_text("crosscoder:\n  expansion_factor: 4\n  k: 8\ntraining:\n  steps: 40\n  batch_size: 128\n"
                      "  warmup_steps: 5\n  threshold_start_step: 10\n  checkpoint_every: 20\n  eval_rows: 256\n")
    run = tmp_path / "run"
    result = _invoke(["train", "--store", str(store), "--config", str(config), "--lr", "0.003", "--loss", "squared",
                      "--out", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads(result.output[result.output.index("{"):]) == metrics
    assert json.loads((run / "train_config.json").read_text())["training"]["loss"] == "squared"
    # The same run directory under the default loss (norm) is another run: refused, with what to do.
    result = _invoke(["train", "--store", str(store), "--config", str(config), "--lr", "0.003", "--out", str(run)])
    assert result.exit_code != 0 and "another config" in result.output, result.output

    for path, expected in ((store, "Activation store"), (run, "Training run"), (run / "crosscoder", "latents=128")):
        result = _invoke(["info", str(path)])
        assert result.exit_code == 0 and expected in result.output, result.output


def test_clear_errors_instead_of_tracebacks(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("crosscoder:\n  dict_sise: 10\n")
    result = CliRunner().invoke(main, ["train", "--store", str(tmp_path), "--config", str(config), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "did you mean 'dict_size'" in result.output
    result = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert result.exit_code != 0 and "holds nothing mneme writes: no activation store" in result.output
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "Nothing to train on" in result.output
    # A missing corpus is named before any model loads (a hub name here would be fetched first).
    result = CliRunner().invoke(main, ["harvest", "--base", "org/not-loaded", "--edited", "org/not-loaded",
                                       "--corpus", str(tmp_path / "nosuch.txt"), "--layer", "1", "--out", str(tmp_path / "h")])
    assert result.exit_code != 0 and f"Corpus {tmp_path / 'nosuch.txt'} does not exist" in result.output
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sees\n")
    result = CliRunner().invoke(main, ["harvest", "--base", "org/not-loaded", "--edited", "org/not-loaded",
                                       "--corpus", str(corpus), "--out", str(tmp_path / "h")])
    assert result.exit_code != 0 and "No layer to read: pass --layer" in result.output
    result = CliRunner().invoke(main, ["remediate", "--run-dir", str(tmp_path), "--edited", "organism:edited-x.safetensors",
                                       "--out", str(tmp_path / "rem")])
    assert result.exit_code != 0 and "retrains Hugging Face models" in result.output and "mneme demo" in result.output


def test_train_streaming_from_a_config_file(llama_pair_dirs, tmp_path):
    base, edited = llama_pair_dirs
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in synthetic_corpus(300, seed=6)))
    config = tmp_path / "stream.yaml"
    config.write_text(
        f"models: {{base: {base}, edited: {edited}}}\ncorpus: {{source: {corpus}}}\n"
        "harvest: {layer: 0, context_length: 32}\n"
        "crosscoder: {expansion_factor: 2, k: 4}\n"
        "training: {steps: 10, batch_size: 64, checkpoint_every: 0, eval_rows: 64, shuffle_buffer_rows: 100}\n"
    )
    # The YAML's buffer is read (too small for the batch: the message names the options) ...
    result = _invoke(["train", "--stream", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "shuffle_buffer_rows (100)" in result.output
    assert "--shuffle-buffer" in result.output and "--train-batch-size" in result.output
    # ... and the command line overrides it.
    result = _invoke(["train", "--stream", "--config", str(config), "--shuffle-buffer", "512", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    info = _invoke(["info", str(tmp_path / "run")]).output
    assert "latents=64" in info and "data: stream" in info


def test_train_on_a_small_store_names_the_option_that_fits_it(tmp_path):
    """The default 8,192 held-out rows are more than half of a small store; the command line had no way
    to lower them (only a config file), and the message did not say how."""
    from tests.helpers import random_activation_pairs, write_activation_store

    store = write_activation_store(tmp_path / "store", random_activation_pairs(600, 16, seed=0), rows_per_shard=300)
    args = ["train", "--store", str(store), "--expansion-factor", "2", "-k", "4", "--steps", "5",
            "--train-batch-size", "64", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "lower it to at most 300 (`mneme train --eval-rows N`" in result.output, result.output
    result = CliRunner().invoke(main, args + ["--eval-rows", "128"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_tokens"] == 128 and metrics["eval_data"] == "held_out"


def test_taxonomies_lists_the_builtins_and_one_taxonomys_ids(tmp_path):
    """Without an argument the built-ins with their sizes; with one (built-in or file) the ids a
    ground-truth table's `categories:` may rename to, in the taxonomy's order."""
    import yaml

    from mneme_plugin.interpret.taxonomy import builtin_taxonomies

    listed = CliRunner().invoke(main, ["taxonomies"])
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.output.splitlines()] == builtin_taxonomies()
    assert "organism                 8 categories" in listed.output
    shown = CliRunner().invoke(main, ["taxonomies", "organism"])
    assert [line.split()[0] for line in shown.output.splitlines()] == [
        "biology", "chemistry", "medicine", "law", "history", "security", "cooking", "sports"]
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"entries": [{"id": "a_b", "name": "A and B"}, {"id": "c", "name": "C"}]}))
    shown = CliRunner().invoke(main, ["taxonomies", str(own)])
    assert shown.exit_code == 0 and shown.output.splitlines() == [f"{'a_b':<40} A and B", f"{'c':<40} C"]
    unknown = CliRunner().invoke(main, ["taxonomies", "mmlu-pro"])
    assert unknown.exit_code != 0 and "Unknown taxonomy 'mmlu-pro': built-ins are" in unknown.output
    assert "Traceback" not in unknown.output


@pytest.mark.parametrize("command", ["map", "explain"])
def test_a_stage_commands_client_choices_are_the_kinds_its_config_takes(command):
    """`mneme map --client` offered every client kind, `stub` included, which MapConfig always refuses."""
    import re

    from mneme_plugin.errors import ConfigError
    from mneme_plugin.interpret.config import CLIENTS, ExplainConfig, MapConfig

    def takes(kind: str) -> bool:  # with some method: an offline one for `none`, an LLM one for the others
        offline, llm = ({"method": "lexical"}, {"method": "llm"}) if command == "map" else (
            {"explainer": "offline"}, {"explainer": "default"})
        for settings in (offline, llm):
            try:
                (MapConfig if command == "map" else ExplainConfig).from_dict({**settings, "client": {"kind": kind}})
                return True
            except ConfigError:
                continue
        return False

    result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    offered = re.search(r"--client \[([a-z|]+)\]", result.output).group(1).split("|")
    assert offered == [kind for kind in CLIENTS if takes(kind)]
    if command == "map":
        assert "stub" not in offered
        refused = CliRunner().invoke(main, ["map", ".", "--method", "llm", "--client", "stub"])
        assert refused.exit_code != 0 and "'stub' is not one of 'none', 'openai', 'vllm'" in refused.output
