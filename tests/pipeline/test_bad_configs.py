"""Bad config files through the CLI: a non-zero exit, no traceback, a message naming what is wrong."""

import pytest
import yaml
from click.testing import CliRunner

from mneme_plugin.cli import main

RUN_BASE = {"models": {"base": "b", "edited": "e"}, "corpus": {"source": "c.txt"}, "harvest": {"layer": 1}}

TRAIN_CASES = [
    ({"training": {"steps": 20.5}}, "training.steps = 20.5 (float): expected an integer"),
    ({"training": {"batch_size": "big"}}, "training.batch_size = 'big' (str): expected an integer"),
    ({"training": {"seed": None}}, "training.seed = None (NoneType): expected an integer"),
    ({"crosscoder": {"k": True}}, "crosscoder.k = True (bool): expected an integer"),
    ({"crosscoder": {"k": "4x"}}, "crosscoder.k = '4x' (str): expected an integer"),
    ({"training": 3}, "training must be a mapping"),
    ({"training": ["steps", 3]}, "training must be a mapping"),
    ({"training": {"stesp": 3}}, "did you mean 'steps'"),
    ({"crosscoder": {"salience": "squared"}}, "salience"),
    ({"trianing": {}}, "Unknown section(s) ['trianing']"),
    # Fields of imported crosscoders, which training ignored (a bfloat16 config trained and saved float32).
    ({"crosscoder": {"dtype": "bfloat16"}}, "crosscoder.dtype: bfloat16: these describe imported crosscoders"),
    ({"crosscoder": {"sparsity": "jumprelu", "normalization": "mean_scale"}},
     "crosscoder.sparsity: jumprelu, crosscoder.normalization: mean_scale: these describe imported"),
    ({"crosscoder": {"salience": "decoupled"}}, "crosscoder.salience: decoupled: these describe imported"),
]

RUN_CASES = [
    ({"harvest": {"layer": "two"}}, "harvest.layer = 'two' (str): expected an integer"),
    ({"harvest": None}, "harvest lacks the required key(s) layer"),
    ({"training": {"lr": "fast"}}, "training.lr = 'fast' (str): expected a number"),
    ({"explain": {"client": "openai"}}, "explain.client must be a mapping"),
    ({"collect": {"harvest": {"layer": 1, "context_length": 100}, "example_ctx_len": 32}},
     "must be a multiple of collect.example_ctx_len"),
    ({"predict": {"rule": "most"}}, "rule must be one of"),
    ({"crosscoder": {"dtype": "float16"}}, "crosscoder.dtype: float16: these describe imported crosscoders"),
    # Found before: only at the collect / predict stage, hours into the run (the dry run said runnable).
    ({"harvest": {"layer": 1, "context_length": 32}, "collect": {"example_ctx_len": 24}},
     "context_length (32) must be a multiple of collect.example_ctx_len (24)"),
    ({"collect": {"classes": ["base_onyl"]}}, "classes names unknown attribution class(es) ['base_onyl']"),
    ({"predict": {"amplified_classes": ["amplifed"]}}, "amplified_classes names unknown attribution class(es)"),
    ({"training": {"device": "tpu"}}, "device must be auto, cpu, cuda, cuda:N or mps"),
    ({"attribution": {"device": "cuda:first"}}, "got 'cuda:first'"),
    ({"run_dir": None}, "needs run_dir"),
    # A section's key at the top level (an indentation slip) names the section it belongs to.
    ({"steps": 100}, "Unknown section(s) 'steps' (a key of training: indent it under training:)"),
    ({"batch_size": 8}, "'batch_size' (a key of harvest / training / attribution: indent it under the section"),
]


def _assert_clear_failure(result, expected):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert expected in result.output, result.output


@pytest.mark.parametrize(("section", "expected"), TRAIN_CASES)
def test_train_config_errors(tmp_path, section, expected):
    (tmp_path / "store").mkdir()
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(section))
    result = CliRunner().invoke(main, ["train", "--store", str(tmp_path / "store"), "--config", str(config),
                                       "--out", str(tmp_path / "out")])
    _assert_clear_failure(result, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "expected"), RUN_CASES)
def test_run_config_errors(tmp_path, change, expected):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **RUN_BASE, **change}))
    for argv in (["run", str(config)], ["run", "--dry-run", str(config)]):
        _assert_clear_failure(CliRunner().invoke(main, argv), expected)
    assert not (tmp_path / "run").exists()


def test_not_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("training: [unclosed\n")
    _assert_clear_failure(CliRunner().invoke(main, ["run", str(tmp_path / "bad.yaml")]), "is not valid YAML")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    _assert_clear_failure(CliRunner().invoke(main, ["run", str(tmp_path / "list.yaml")]), "must hold a mapping")
    (tmp_path / "bytes.yaml").write_bytes(b"\xff\xfe\x00bad")
    _assert_clear_failure(CliRunner().invoke(main, ["run", str(tmp_path / "bytes.yaml")]), "not UTF-8")


def test_a_section_given_twice(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **RUN_BASE}) + "harvest:\n  layer: 2\n")
    _assert_clear_failure(CliRunner().invoke(main, ["run", "--dry-run", str(config)]),
                          "key 'harvest' appears twice in one mapping")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("corpus.csv", "text\nthe cat sees the dog\n", "has the unsupported file type '.csv'"),
    ("corpus.jsonl", "", "is empty"),
    ("corpus.txt", "\n  \n", "is empty"),
])
def test_an_unreadable_corpus_file_is_refused_before_any_stage(tmp_path, llama_dir, name, content, expected):
    """The harvest would refuse these corpus files, but only after the stages before it (an intervention
    can take hours): the dry run and the run's own checks name them first; so does `mneme harvest`."""
    corpus = tmp_path / name
    corpus.write_text(content)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **RUN_BASE,
                                      "models": {"base": str(llama_dir), "edited": str(llama_dir)},
                                      "corpus": {"source": str(corpus)}}))
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    _assert_clear_failure(dry, f"FAIL corpus.source: {corpus} {expected}")
    _assert_clear_failure(CliRunner().invoke(main, ["run", str(config)]), "nothing was run")
    assert not (tmp_path / "run").exists()
    harvest = CliRunner().invoke(main, ["harvest", "--base", str(llama_dir), "--edited", str(llama_dir), "--corpus",
                                        str(corpus), "--layer", "1", "--out", str(tmp_path / "store")])
    _assert_clear_failure(harvest, f"Corpus {corpus} {expected}")


def test_a_mistyped_model_folder_stops_the_run_before_it_discards_anything(tmp_path, llama_dir, monkeypatch):
    """`models/edtied` (a typo of the local models/edited) read as a hub name passed the checks; the run then
    discarded the previous config's finished stages and failed at the harvest, after the hub's retries."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama_dir, tmp_path / "models" / "edited")
    (tmp_path / "corpus.txt").write_text("the cat sees the dog\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": "run", **RUN_BASE, "corpus": {"source": "corpus.txt"},
                                      "models": {"base": "models/edited", "edited": "models/edtied"}}))
    expected = "models.edited: there is no model folder models/edtied (did you mean models/edited?)"
    _assert_clear_failure(CliRunner().invoke(main, ["run", "--dry-run", str(config)]), f"FAIL {expected}")
    _assert_clear_failure(CliRunner().invoke(main, ["run", str(config)]), expected)
    assert not (tmp_path / "run").exists()


def test_the_dry_run_warns_when_base_and_edited_are_the_same_model(tmp_path, llama_dir):
    (tmp_path / "corpus.txt").write_text("the cat sees the dog\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **RUN_BASE,
                                      "corpus": {"source": str(tmp_path / "corpus.txt")},
                                      "models": {"base": str(llama_dir), "edited": f"{llama_dir}/."}}))
    result = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    assert result.exit_code == 0, result.output
    assert f"  WARN models.base and models.edited are the same model ({llama_dir})" in result.output
    assert "The config looks runnable, but read the WARN lines above first." in result.output


def test_a_stream_shorter_than_the_training_is_refused_before_any_stage(tmp_path, llama_dir):
    """A streamed training reads the corpus once: 50k steps of 4,096 rows from 50M tokens (the recipes' first
    configs) passed the dry run and stopped at step ~12k with "The data stream ended", hours in."""
    (tmp_path / "corpus.txt").write_text("the cat sees the dog\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), **RUN_BASE, "corpus": {"source": str(tmp_path / "corpus.txt")},
        "models": {"base": str(llama_dir), "edited": str(llama_dir)},
        "harvest": {"layer": 1, "context_length": 32, "max_tokens": 6000},  # 188 windows: 6,016 tokens
        "training": {"stream": True, "steps": 60, "batch_size": 128}}))
    expected = ("FAIL training: 60 steps of batch_size 128 need 7,680 activation rows, but with training.stream the "
                "corpus is read once")
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    _assert_clear_failure(dry, expected)
    assert ("the harvest reads 6,016 tokens (harvest.max_tokens in whole windows): the training would stop at about "
            "step 47. Raise harvest.max_tokens (--max-tokens) to at least 7,680 or lower training.steps to at most 47."
            in " ".join(dry.output.split()))
    # `mneme train --stream` alone: refused before its models load, with the same words.
    train = CliRunner().invoke(main, ["train", "--stream", "--base", str(llama_dir), "--edited", str(llama_dir),
                                      "--corpus", str(tmp_path / "corpus.txt"), "--layer", "1", "--context-length",
                                      "32", "--max-tokens", "6000", "--steps", "60", "--train-batch-size", "128",
                                      "--out", str(tmp_path / "cc")])
    assert train.exit_code != 0 and "need 7,680 activation rows" in train.output, train.output
    assert not (tmp_path / "cc").exists()
    _assert_clear_failure(CliRunner().invoke(main, ["run", str(config)]), "nothing was run")
    assert not (tmp_path / "run").exists()
    # 47 steps of 128 rows fit in the 6,016 tokens read; so does the same run from a store (read in epochs).
    for training in ({"stream": True, "steps": 47, "batch_size": 128}, {"steps": 60, "batch_size": 128}):
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "training": training}))
        assert "FAIL training" not in CliRunner().invoke(main, ["run", "--dry-run", str(config)]).output


def test_missing_relative_paths_name_the_directory_they_are_read_from(tmp_path, monkeypatch):
    """A recipe's smoke.yaml run from another folder than the one its make_smoke.py wrote into: the
    errors named smoke/... as missing without saying where the run looked for it."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": "run", **RUN_BASE, "models": {"base": "smoke/base", "edited": "smoke/e"}}))
    expected = f"Relative paths in the config are read from the current directory, {tmp_path}."
    _assert_clear_failure(CliRunner().invoke(main, ["run", "--dry-run", str(config)]), expected)
    _assert_clear_failure(CliRunner().invoke(main, ["run", str(config)]), expected)


@pytest.mark.parametrize("tasks, categories, expected", [
    (["wmdp", "wmdp_cyber"], {},
     "ground_truth.tables.wmdp.lm_eval: lm-eval task wmdp_cyber is listed twice in tasks: 'wmdp' and 'wmdp_cyber'"),
    (["wmdp"], {"wmdp_bio": "virology"},
     "ground_truth.tables.wmdp.categories: ['wmdp_bio'] name no category of the table; wmdp_bio is the lm-eval "
     "task of category 'bio'. Its categories: ['bio', 'cyber']."),
    (["wmdp"], {"bio": "virolgy"},
     "ground_truth.tables.wmdp.categories: ['virolgy'] are no ids of taxonomy 'mmlu'; close to virolgy: ['virology', 'sociology']"),
    (["wmdp"], {}, "ground_truth.tables.wmdp: none of its categories (['bio', 'cyber']) is an id of taxonomy 'mmlu'"),
    (["wmpd"], {}, "ground_truth.tables.wmdp.lm_eval: lm-eval does not know task(s) ['wmpd']; close to wmpd: ['wmdp'"),
])
def test_an_lm_eval_task_list_lm_eval_would_refuse_stops_the_run_before_any_stage(tmp_path, llama_dir, tasks,
                                                                                  categories, expected):
    """A group and one of its tasks both listed: lm-eval refuses it only in the ground-truth stage, after
    the intervention (hours); a `categories` key naming no task of the group was found only once lm-eval
    had measured both models; a `categories` target that is no id of the table's taxonomy put the row
    outside it, unscored, and a table with no category of its taxonomy failed at evaluate. The dry run
    names them, and `mneme run` before the first stage."""
    from tests.helpers import write_lm_eval_group, write_lm_eval_task

    task_folder = tmp_path / "tasks"
    task_folder.mkdir()
    for seed, name in enumerate(("wmdp_bio", "wmdp_cyber")):
        write_lm_eval_task(task_folder, name, 4, seed=seed)
    write_lm_eval_group(task_folder, "wmdp", ["wmdp_bio", "wmdp_cyber"])
    (tmp_path / "corpus.txt").write_text("the cat sees the dog\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), **RUN_BASE, "corpus": {"source": str(tmp_path / "corpus.txt")},
        "models": {"base": str(llama_dir), "edited": str(llama_dir)},
        "ground_truth": {"tables": {"wmdp": {"taxonomy": "mmlu", "categories": categories, "lm_eval": {
            "tasks": tasks, "include_path": [str(task_folder)], "include_defaults": False, "device": "cpu"}}}}}))
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    _assert_clear_failure(dry, f"FAIL {expected.split(':')[0]}")
    assert expected in " ".join(dry.output.split())
    result = CliRunner().invoke(main, ["run", str(config)])
    _assert_clear_failure(result, "nothing was run")
    assert expected in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_a_hosted_judge_without_its_key_stops_the_run_before_any_stage(tmp_path, llama_dir, monkeypatch):
    """The judge presets call api.openai.com with `api_key: env:OPENAI_API_KEY`; with the variable unset the
    dry run said "runnable" and `mneme run` ran the intervention and the base model's answers before every
    judge call failed. Now the dry run warns (as of a hub model missing here: the environment that runs the
    config may set it) and the run refuses before its first stage; a run whose ground truth is not among the
    stages it will run (`--only harvest`) needs no key."""
    monkeypatch.delenv("MNEME_TEST_JUDGE_KEY", raising=False)
    (tmp_path / "corpus.txt").write_text("the cat sees the dog\n")
    (tmp_path / "q.jsonl").write_text('{"question": "the cat sees", "category": "x"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), **RUN_BASE, "corpus": {"source": str(tmp_path / "corpus.txt")},
        "models": {"base": str(llama_dir), "edited": str(llama_dir)}, "map": {"taxonomies": ["harm_categories"]},
        "ground_truth": {"tables": {"harm": {"taxonomy": "harm_categories", "judge": {
            "preset": "hexphi_judge", "questions": str(tmp_path / "q.jsonl"),
            "judge": {"kind": "openai", "model": "gpt-4-0613", "base_url": "https://api.openai.com/v1",
                      "api_key": "env:MNEME_TEST_JUDGE_KEY"}}}}}}))
    expected = ("ground_truth.tables.harm.judge.judge: https://api.openai.com/v1 needs an API key; its api_key "
                "(env:MNEME_TEST_JUDGE_KEY) reads the environment variable MNEME_TEST_JUDGE_KEY, which is not set")
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    assert dry.exit_code == 0 and "WARN ground_truth.tables.harm.judge.judge" in dry.output, dry.output
    assert expected in " ".join(dry.output.split()) and "(`mneme run` refuses it in this environment)" in dry.output
    assert "The config looks runnable, but read the WARN lines above first." in dry.output
    result = CliRunner().invoke(main, ["run", str(config)])
    _assert_clear_failure(result, "has no API key; nothing was run")
    assert expected in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()
    only = CliRunner().invoke(main, ["run", "--dry-run", "--only", "harvest", str(config)])
    assert only.exit_code == 0 and "API key" not in only.output, only.output
    monkeypatch.setenv("MNEME_TEST_JUDGE_KEY", "sk-test")
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    assert dry.exit_code == 0 and "API key" not in dry.output, dry.output
