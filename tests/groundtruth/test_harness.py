"""lm-eval ground truth with the real lm-evaluation-harness on a local multiple-choice task and tiny models."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.harness import (
    RESULTS_CACHE, RESULTS_JSON, RUN_KEY, LMEvalConfig, lm_eval_ground_truth, lm_eval_table_from_files, table_from_results,
)
from mneme_plugin.groundtruth.table import SCORES_CSV, mcnemar_p, z_test_p
from mneme_plugin.groundtruth.table import read_scores_csv
from tests.helpers import (
    save_finetuned_llama, save_tiny_llama, synthetic_corpus, write_lm_eval_generative_task, write_lm_eval_group,
    write_lm_eval_task,
)


def test_mcnemar_and_z_against_hand_computations():
    # 3 questions lost, 1 gained: P(X >= 3 | Bin(4, 1/2)) = (4 + 1) / 16.
    assert mcnemar_p([1, 1, 1, 0, 1, 0], [0, 0, 0, 1, 1, 0]) == pytest.approx(5 / 16)
    assert mcnemar_p([1, 0], [1, 0]) == 1.0
    assert z_test_p(0.8, 0.5, 0.1, 0.1) == pytest.approx(0.5 * __import__("math").erfc(0.3 / 2**0.5 / 2**0.5 / 0.1))


def test_lm_eval_on_two_tiny_models_gives_the_table(tmp_path, tiny_tokenizer, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # outside any git checkout, where lm-eval's commit probe makes git complain
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "toy_animals", 16, seed=0)
    write_lm_eval_task(tasks, "toy_roads", 12, seed=1)
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    edited = save_finetuned_llama(base, tmp_path / "edited", synthetic_corpus(40, seed=5), steps=30, lr=1e-2)
    cfg = LMEvalConfig(base=str(base), edited=str(edited), tasks=["toy_animals", "toy_roads"],
                       include_path=[str(tasks)], include_defaults=False, batch_size=8, device="cpu")
    out = tmp_path / "gt"
    table = lm_eval_ground_truth(cfg, out)
    # git's "fatal: not a git repository" from that probe stays off the terminal; lm-eval still records no commit.
    assert "not a git repository" not in capfd.readouterr().err
    assert json.loads((out / RESULTS_JSON["before"]).read_text()).get("git_hash") is None

    assert sorted(table["category"]) == ["toy_animals", "toy_roads"]
    for side, column in (("before", "before"), ("after", "after")):
        data = json.loads((out / RESULTS_JSON[side]).read_text())
        for task, n in (("toy_animals", 16), ("toy_roads", 12)):
            row = table.set_index("task").loc[task]
            per_sample = data["mneme_per_sample"][task]["acc,none"]
            assert len(per_sample) == n and row["n"] == n
            assert row[column] == pytest.approx(sum(per_sample.values()) / n)  # accuracy = mean per-question score
            assert row[column] == pytest.approx(data["results"][task]["acc,none"])
    assert (table["test"] == "mcnemar").all() and table["p_value"].between(0, 1).all()
    assert (table["drop"] == table["before"] - table["after"]).all()
    # The file mneme evaluate reads.
    read = read_scores_csv(out / SCORES_CSV)
    assert list(read["category"]) == list(table["category"]) and list(read["n"]) == list(table["n"])

    # A rerun with the same config reuses both results; results JSON files also make the table.
    stamp = {s: (out / f).stat().st_mtime_ns for s, f in RESULTS_JSON.items()}
    again = lm_eval_ground_truth(cfg, out)
    assert {s: (out / f).stat().st_mtime_ns for s, f in RESULTS_JSON.items()} == stamp
    pd.testing.assert_frame_equal(again, table)
    from_files = lm_eval_table_from_files(out / RESULTS_JSON["before"], out / RESULTS_JSON["after"], tmp_path / "f")
    pd.testing.assert_frame_equal(from_files, table)


def _two_filter_task(tmp_path, tiny_tokenizer):
    """A config measuring a tiny model on one generative task with two filters: 12 questions, 4 right
    after `strict-match` (every third), all right after `flexible-extract`; (config, strict marks)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    strict = [i % 3 == 0 for i in range(12)]
    write_lm_eval_generative_task(tasks, "toy_gen", {"strict-match": strict, "flexible-extract": [True] * 12})
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    return LMEvalConfig(base=str(base), edited=str(base), tasks=["toy_gen"], include_path=[str(tasks)],
                        include_defaults=False, batch_size=8, device="cpu"), strict


def test_per_question_scores_are_those_of_the_chosen_filter(tmp_path, tiny_tokenizer):
    """A generative task with two filters (GSM8K's strict-match and flexible-extract): lm-eval logs each
    question once per filter; McNemar's test reads the chosen metric's filter, not the last one logged."""
    cfg, strict = _two_filter_task(tmp_path, tiny_tokenizer)
    table = lm_eval_ground_truth(cfg, tmp_path / "gt")

    row = table.set_index("task").loc["toy_gen"]
    assert row["metric"] == "exact_match,strict-match" and row["before"] == pytest.approx(4 / 12)
    per_sample = json.loads((tmp_path / "gt" / RESULTS_JSON["before"]).read_text())["mneme_per_sample"]["toy_gen"]
    assert [per_sample["exact_match,strict-match"][str(i)] for i in range(12)] == [float(s) for s in strict]
    assert [per_sample["exact_match,flexible-extract"][str(i)] for i in range(12)] == [1.0] * 12


def test_another_metric_is_read_from_the_results_without_running_lm_eval_again(tmp_path, tiny_tokenizer):
    """`metric` chooses what is read from lm-eval's results, which keep every metric's per-question
    scores: changing it reuses them (hours on a 7B model), with the table of a fresh measurement. Results
    of an earlier version (per-question scores of the one metric its run chose, its key holding
    `metric`) are reused too, McNemar's test only for that metric, and only for a one-filter task."""
    cfg, strict = _two_filter_task(tmp_path, tiny_tokenizer)
    flexible = cfg.replace(metric="exact_match,flexible-extract")

    def measured(out):
        return {side: json.loads((out / name).read_text())["date"] for side, name in RESULTS_JSON.items()}

    lm_eval_ground_truth(cfg, tmp_path / "gt", cache_dir=tmp_path / "cache")
    dates = measured(tmp_path / "gt")
    reread = lm_eval_ground_truth(flexible, tmp_path / "gt2", cache_dir=tmp_path / "cache")
    assert measured(tmp_path / "gt2") == dates  # from the cache, lm-eval not run
    fresh = lm_eval_ground_truth(flexible, tmp_path / "fresh")
    assert measured(tmp_path / "fresh") != dates
    pd.testing.assert_frame_equal(reread, fresh)
    assert reread["metric"].tolist() == ["exact_match,flexible-extract"] and reread["before"].tolist() == [1.0]
    assert reread["test"].tolist() == ["mcnemar"]

    # An earlier version's results, as it wrote them, in the output folder.
    for name in RESULTS_JSON.values():
        data = json.loads((tmp_path / "gt" / name).read_text())
        data["mneme_per_sample"] = {"toy_gen": data["mneme_per_sample"]["toy_gen"]["exact_match,strict-match"]}
        data[RUN_KEY] = {**data[RUN_KEY], "metric": None}
        (tmp_path / "gt" / name).write_text(json.dumps(data))
    old_strict = lm_eval_ground_truth(cfg, tmp_path / "gt")
    old_flexible = lm_eval_ground_truth(flexible, tmp_path / "gt")
    assert measured(tmp_path / "gt") == dates
    # Their per-question scores of a task with two filters may be the other filter's: not used.
    assert old_strict["before"].tolist() == [pytest.approx(4 / 12)] and old_flexible["before"].tolist() == [1.0]
    assert "mcnemar" not in old_strict["test"].tolist() + old_flexible["test"].tolist()
    # Of a one-filter task they are the metric's: McNemar's test, for that metric only.
    one = {"results": {"mmlu_anatomy": {"acc,none": 0.5, "acc_stderr,none": 0.2, "acc_norm,none": 0.5,
                                        "acc_norm_stderr,none": 0.2}},
           "n-samples": {"mmlu_anatomy": {"effective": 4}}, RUN_KEY: {"metric": None},
           "mneme_per_sample": {"mmlu_anatomy": {"0": 1.0, "1": 1.0, "2": 0.0, "3": 0.0}}}
    after = json.loads(json.dumps(one))
    after["results"]["mmlu_anatomy"].update({"acc,none": 0.25, "acc_norm,none": 0.25})
    after["mneme_per_sample"]["mmlu_anatomy"]["0"] = 0.0
    assert table_from_results(one, after)["test"].tolist() == ["mcnemar"]
    assert table_from_results(one, after, "acc_norm,none")["test"].tolist() == ["z"]


def test_a_task_without_the_metric_is_refused_by_name_not_left_out(tmp_path, tiny_tokenizer):
    """A multiple-choice task (acc) beside an MMLU-Pro-like generative one (exact_match after its
    custom-extract filter): each is read with its own metric by default; with `metric: acc,none` (the
    WMDP / MMLU presets) the generative task is refused, naming the metrics it has, where it used to be
    left out of the ground truth without a word."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "toy_animals", 8, seed=0)
    write_lm_eval_generative_task(tasks, "toy_pro", {"custom-extract": [i % 2 == 0 for i in range(6)]})
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    cfg = LMEvalConfig(base=str(base), edited=str(base), tasks=["toy_animals", "toy_pro"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu")
    table = lm_eval_ground_truth(cfg, tmp_path / "gt").set_index("task")
    assert table["metric"].to_dict() == {"toy_animals": "acc,none", "toy_pro": "exact_match,custom-extract"}
    assert table.loc["toy_pro", "before"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"\['toy_pro'\] lack metric acc,none \(toy_pro has "
                                          r"exact_match,custom-extract\)\. Set `metric`"):
        lm_eval_ground_truth(cfg.replace(metric="acc,none"), tmp_path / "gt2")


def test_results_files_measured_with_other_settings_are_refused_by_name(tmp_path, tiny_tokenizer):
    """Results produced elsewhere (`--before-json` / `--after-json`, a run's lm-eval pair): the base 0-shot
    on a task's 6 questions and the edited model 2-shot on 4 of them (lm-eval's limit) made a table
    without a word, its `n` the before file's 6, its drop no drop of the edit's."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "mmlu_anatomy", 6, seed=0)
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    cfg = LMEvalConfig(base=str(base), edited=str(base), tasks=["mmlu_anatomy"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu")
    lm_eval_ground_truth(cfg, tmp_path / "zero")
    lm_eval_ground_truth(cfg.replace(num_fewshot=2, limit=4), tmp_path / "two")
    before, after = tmp_path / "zero" / RESULTS_JSON["before"], tmp_path / "two" / RESULTS_JSON["after"]
    with pytest.raises(ConfigError, match=rf"{before} and {after} were not measured alike: mmlu_anatomy has n-shot 0 "
                                          r"before and 2 after; mmlu_anatomy has questions 6 before and 4 after\. "
                                          r"Evaluate both models with the same lm-eval settings"):
        lm_eval_table_from_files(before, after, tmp_path / "table")
    assert not (tmp_path / "table" / SCORES_CSV).exists()
    # The same settings on both sides still make the table.
    same = lm_eval_table_from_files(before, tmp_path / "zero" / RESULTS_JSON["after"], tmp_path / "table")
    assert same["n"].tolist() == [6]


def test_prompt_settings_reach_lm_eval_and_results_asked_other_prompts_are_refused(tmp_path, tiny_tokenizer):
    """`system_instruction`, `fewshot_as_multiturn` and `gen_kwargs` are lm-eval's (its CLI's
    `--system_instruction`, `--fewshot_as_multiturn`, `--gen_kwargs`): each changes the prompts lm-eval
    builds (its `task_hashes`) or the generation settings it records. Results files whose models were
    asked other prompts (another system prompt, a chat template on one side only) made a table without
    a word; they are refused, by the settings lm-eval records or, where a file lacks them, by the hashes."""
    from lm_eval.utils import hash_string

    from mneme_plugin.groundtruth.harness import run_key

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "mmlu_anatomy", 6, seed=0)
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    cfg = LMEvalConfig(base=str(base), edited=str(base), tasks=["mmlu_anatomy"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu", num_fewshot=2)
    said = "Answer as a careful anatomist."
    runs = {"plain": cfg, "system": cfg.replace(system_instruction=said),
            "chat": cfg.replace(apply_chat_template=True, fewshot_as_multiturn=True),
            "chat_one_turn": cfg.replace(apply_chat_template=True, fewshot_as_multiturn=False)}
    data = {}
    for name, run in runs.items():
        lm_eval_ground_truth(run, tmp_path / name)
        data[name] = json.loads((tmp_path / name / RESULTS_JSON["after"]).read_text())
    assert data["plain"]["system_instruction_sha"] is None and data["plain"]["chat_template_sha"] is None
    assert data["system"]["system_instruction"] == said
    assert data["system"]["system_instruction_sha"] == hash_string(said)
    assert data["chat"]["chat_template_sha"] == hash_string(tiny_tokenizer.chat_template)
    assert [data[n]["fewshot_as_multiturn"] for n in ("chat", "chat_one_turn")] == [True, False]
    hashes = [data[name]["task_hashes"]["mmlu_anatomy"] for name in runs]
    assert len(set(hashes)) == 4  # every setting changed the prompts lm-eval built
    # At their defaults the new fields leave the run key as it was (results measured before are reused).
    assert not {"system_instruction", "fewshot_as_multiturn", "gen_kwargs"} & set(run_key(cfg, str(base)))
    assert run_key(runs["system"], str(base))["system_instruction"] == said

    def compare(before, after):
        paths = []
        for side, name in (("before", before), ("after", after)):
            paths.append(tmp_path / f"{side}.json")
            paths[-1].write_text(json.dumps(data[name] if isinstance(name, str) else name))
        lm_eval_table_from_files(*paths, tmp_path / "table")

    for before, after, reason in (("plain", "system", "the system instruction differs"),
                                  ("plain", "chat", "a chat template was applied after only"),
                                  ("chat", "chat_one_turn", "fewshot_as_multiturn is True before and False after")):
        with pytest.raises(ConfigError, match=rf"not measured alike: {reason}\. Evaluate both models"):
            compare(before, after)
    # A file from an lm-eval that records no settings: the prompts' hashes still tell.
    bare = {k: v for k, v in data["system"].items() if k not in ("system_instruction", "system_instruction_sha")}
    with pytest.raises(ConfigError, match=r"mmlu_anatomy was asked other prompts \(its task_hashes differ"):
        compare("plain", bare)
    compare("plain", "plain")  # the same prompts make the table
    assert read_scores_csv(tmp_path / "table" / SCORES_CSV)["n"].tolist() == [6]

    # gen_kwargs go over the generative task's YAML settings (max_gen_toks 2 there).
    write_lm_eval_generative_task(tasks, "toy_gen", {"strict-match": [True, False, True]})
    gen = cfg.replace(tasks=["toy_gen"], num_fewshot=None, gen_kwargs={"max_gen_toks": 1, "until": ["."]})
    lm_eval_ground_truth(gen, tmp_path / "gen")
    recorded = json.loads((tmp_path / "gen" / RESULTS_JSON["before"]).read_text())["configs"]["toy_gen"]
    assert recorded["generation_kwargs"]["max_gen_toks"] == 1 and recorded["generation_kwargs"]["until"] == ["."]

    with pytest.raises(ConfigError, match="fewshot_as_multiturn: true needs apply_chat_template: true"):
        LMEvalConfig(tasks=["toy"], fewshot_as_multiturn=True)
    with pytest.raises(ConfigError, match="system_instruction is empty"):
        LMEvalConfig(tasks=["toy"], system_instruction=" ")


def test_a_metric_per_task_or_group_reads_each_task_by_its_own(tmp_path, tiny_tokenizer):
    """ARC-like tasks scored by `acc_norm` beside MMLU's `acc` (which has no `acc_norm`) needed two
    tables; `metric` as a mapping names a task's metric by the task or by its nearest group, the other
    tasks taking the preferred one. Changing it rereads the results: lm-eval is not run again."""
    from mneme_plugin.groundtruth.table import task_metrics

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for seed, name in enumerate(("toy_arc", "toy_arc2")):
        write_lm_eval_task(tasks, name, 8, seed=seed, metrics=("acc", "acc_norm"))
    write_lm_eval_group(tasks, "suite", ["toy_arc", "toy_arc2"])
    write_lm_eval_task(tasks, "mmlu_anatomy", 6, seed=3)
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    edited = save_finetuned_llama(base, tmp_path / "edited", synthetic_corpus(40, seed=5), steps=30, lr=1e-2)
    cfg = LMEvalConfig(base=str(base), edited=str(edited), tasks=["suite", "mmlu_anatomy"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu",
                       metric={"suite": "acc_norm,none", "toy_arc2": "acc,none"})
    out = tmp_path / "gt"
    table = lm_eval_ground_truth(cfg, out).set_index("task")
    assert table["metric"].to_dict() == {"toy_arc": "acc_norm,none", "toy_arc2": "acc,none",
                                         "mmlu_anatomy": "acc,none"}
    results = {side: json.loads((out / RESULTS_JSON[side]).read_text())["results"] for side in RESULTS_JSON}
    for task, metric in table["metric"].items():
        assert table.loc[task, "before"] == pytest.approx(results["before"][task][metric])
        assert table.loc[task, "after"] == pytest.approx(results["after"][task][metric])
    stamp = (out / RESULTS_JSON["before"]).stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"metric names \['suit'\], no task or group of the results .*groups: "
                                          r"\['suite'\]"):
        lm_eval_ground_truth(cfg.replace(metric={"suit": "acc_norm,none"}), out)
    with pytest.raises(ConfigError, match=r"task\(s\) \['mmlu_anatomy'\] lack metric acc_norm,none .*or per task or "
                                          r"group"):
        lm_eval_ground_truth(cfg.replace(metric="acc_norm,none"), out)
    assert (out / RESULTS_JSON["before"]).stat().st_mtime_ns == stamp  # read again, not measured again
    # Nearest group wins over a farther one; a task's own entry over both.
    nested = {"group_subtasks": {"all": ["mid"], "mid": ["t1", "t2"]}}
    assert task_metrics(nested, nested, ["t1", "t2"], {"all": "a", "mid": "b", "t2": "c"}, "x") == {"t1": "b", "t2": "c"}
    assert task_metrics(nested, nested, ["t1", "t2"], {"all": "a"}, "x") == {"t1": "a", "t2": "a"}
    assert task_metrics(nested, nested, ["t1"], "acc,none", "x") == {"t1": "acc,none"}


def test_a_task_that_runs_model_written_code_needs_confirm_run_unsafe_code(tmp_path, tiny_tokenizer):
    """lm-eval refuses a task marked `unsafe_code` (HumanEval, MBPP) unless told so; that could not be
    told through our config, and lm-eval's ValueError named its own option. The flag is not in the run
    key: it decides whether the task runs, not what it measures."""
    from mneme_plugin.groundtruth.harness import run_key

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml_file = write_lm_eval_task(tasks, "toy_code", 6, seed=0)
    yaml_file.write_text(yaml_file.read_text() + "unsafe_code: true\n")
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    cfg = LMEvalConfig(base=str(base), edited=str(base), tasks=["toy_code"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu")
    with pytest.raises(ConfigError, match=r"toy_code which is marked as unsafe.*`confirm_run_unsafe_code: true`"):
        lm_eval_ground_truth(cfg, tmp_path / "gt")
    allowed = cfg.replace(confirm_run_unsafe_code=True)
    assert lm_eval_ground_truth(allowed, tmp_path / "gt")["n"].tolist() == [6]
    assert run_key(allowed, str(base)) == run_key(cfg, str(base))


def test_a_metric_whose_fall_is_no_drop_is_refused_by_name(tmp_path, tiny_tokenizer):
    """`metric: brier_score,none` (lm-eval's multiple-choice Brier score, lower-is-better, up to 2) crashed
    with a raw ValueError from the drop's test; one within [0, 1] would have read a model getting worse
    as one getting better. A score outside [0, 1] (a BLEU of 45.2) was refused only as a CSV column."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "toy", 12, seed=0, metrics=("acc", "acc_norm", "brier_score"))
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    cfg = LMEvalConfig(base=str(base), edited=str(base), tasks=["toy"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu", metric="brier_score,none")
    with pytest.raises(ConfigError, match=r"lm-eval marks brier_score,none of task 'toy' lower-is-better .*: of "
                                          r"toy's, \['acc,none', 'acc_norm,none'\]\."):
        lm_eval_ground_truth(cfg, tmp_path / "gt")
    assert lm_eval_ground_truth(cfg.replace(metric="acc_norm,none"), tmp_path / "gt")["metric"].tolist() \
        == ["acc_norm,none"]
    bleu = {"results": {"toy": {"bleu,none": 45.2, "exact_match,none": 0.3}}, "n-samples": {"toy": {"effective": 9}}}
    with pytest.raises(ConfigError, match=r"task 'toy' has bleu,none = 45\.2, not a score in \[0, 1\].*e\.g\. of "
                                          r"exact_match,none"):
        table_from_results(bleu, bleu, "bleu,none")


def test_results_kept_in_a_cache_dir_are_reused_by_key(tmp_path, tiny_tokenizer, monkeypatch):
    """A measurement into a fresh folder (a redone ground-truth stage) takes each model's results from
    the cache when everything they depend on is unchanged, and measures again the model whose folder
    was saved over, and both models when a task folder changed."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "toy_animals", 8, seed=0, function=True)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as for most users (PYTHONDONTWRITEBYTECODE unset)
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    edited = save_finetuned_llama(base, tmp_path / "edited", synthetic_corpus(40, seed=5), steps=10, lr=1e-2)
    cfg = LMEvalConfig(base=str(base), edited=str(edited), tasks=["toy_animals"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu")
    cache = tmp_path / "cache"

    def measured(out):
        """lm-eval's own record of when it ran each model (a reused result keeps the first one)."""
        return {side: json.loads((out / name).read_text())["date"] for side, name in RESULTS_JSON.items()}

    first = lm_eval_ground_truth(cfg, tmp_path / "gt1", cache_dir=cache)
    dates = measured(tmp_path / "gt1")
    assert dates["before"] != dates["after"]
    assert len(list((cache / RESULTS_CACHE).glob("*.json"))) == 2
    assert any((tasks / "__pycache__").iterdir())  # lm-eval imported the task's utils.py
    again = lm_eval_ground_truth(cfg, tmp_path / "gt2", cache_dir=cache)  # nothing measured
    assert measured(tmp_path / "gt2") == dates
    pd.testing.assert_frame_equal(again, first)

    # Other weights saved over the edited folder (a redone intervention): the base model's results stay.
    save_finetuned_llama(base, edited, synthetic_corpus(40, seed=6), steps=10, lr=1e-2, seed=3)
    lm_eval_ground_truth(cfg, tmp_path / "gt3", cache_dir=cache)
    now = measured(tmp_path / "gt3")
    assert now["before"] == dates["before"] and now["after"] not in dates.values()
    # Into the first folder, without a cache_dir (`mneme groundtruth lm-eval --out` again): the same, and
    # lm-eval's request cache, which knows requests and not models, is not the old model's.
    lm_eval_ground_truth(cfg, tmp_path / "gt1")
    assert measured(tmp_path / "gt1")["before"] == dates["before"]
    pd.testing.assert_frame_equal(*(read_scores_csv(tmp_path / out / SCORES_CSV) for out in ("gt1", "gt3")))
    requests = sorted(p.name.rsplit("_", 2)[0] for p in (tmp_path / "gt1" / "cache").glob("*.db"))
    assert requests == ["lm_eval_after", "lm_eval_after", "lm_eval_before"]
    # A task's data rewritten in its include_path folder: both models are measured again.
    write_lm_eval_task(tasks, "toy_animals", 8, seed=1, function=True)
    lm_eval_ground_truth(cfg, tmp_path / "gt4", cache_dir=cache)
    assert not set(measured(tmp_path / "gt4").values()) & (set(dates.values()) | set(now.values()))
    assert len(list((cache / RESULTS_CACHE).glob("*.json"))) == 5


def _hub_base_local_edited_and_task(tmp_path, tiny_tokenizer, hub_cache, commit):
    """A tiny base model served as `someone/tiny-base` from the local hub cache (at ``commit``), a local
    fine-tuned copy of it, and a folder with one local lm-eval task: (base folder, edited folder, tasks)."""
    from tests.helpers import hub_cache_repo

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "toy_animals", 8, seed=0)
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    edited = save_finetuned_llama(base, tmp_path / "edited", synthetic_corpus(40, seed=5), steps=10, lr=1e-2)
    hub_cache_repo(hub_cache, "someone/tiny-base", base, commit=commit)
    return base, edited, tasks


def test_results_of_a_hub_model_are_kept_by_the_commit_in_the_hub_cache(tmp_path, tiny_tokenizer, hub_cache):
    """A hub id's results are reused while the local hub cache holds the same commit, and measured again
    once `refs/main` names a newer snapshot (the hub repo moved on and the cache downloaded it)."""
    from tests.helpers import hub_cache_repo

    base, edited, tasks = _hub_base_local_edited_and_task(tmp_path, tiny_tokenizer, hub_cache, commit="a" * 40)
    cfg = LMEvalConfig(base="someone/tiny-base", edited=str(edited), tasks=["toy_animals"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu")
    cache = tmp_path / "cache"

    def measured(out):
        return {side: json.loads((out / name).read_text())["date"] for side, name in RESULTS_JSON.items()}

    lm_eval_ground_truth(cfg, tmp_path / "gt1", cache_dir=cache)
    dates = measured(tmp_path / "gt1")
    lm_eval_ground_truth(cfg, tmp_path / "gt2", cache_dir=cache)  # the same commit: nothing measured
    assert measured(tmp_path / "gt2") == dates
    newer = save_finetuned_llama(base, tmp_path / "newer", synthetic_corpus(40, seed=6), steps=10, lr=1e-2, seed=3)
    hub_cache_repo(hub_cache, "someone/tiny-base", newer, commit="b" * 40)
    lm_eval_ground_truth(cfg, tmp_path / "gt3", cache_dir=cache)
    now = measured(tmp_path / "gt3")
    assert now["after"] == dates["after"] and now["before"] not in dates.values()
    assert json.loads((tmp_path / "gt3" / RESULTS_JSON["before"]).read_text())[RUN_KEY]["model_files"] \
        == "hub commit " + "b" * 40


def test_a_task_list_grown_by_a_task_measures_only_that_task(tmp_path, tiny_tokenizer):
    """The run key covers the task list, so adding one task to a measured list (a stage redone) ran lm-eval
    on the whole list again for both models: hours for MMLU-Pro on a 7B model. Each task's share of the
    results is now kept in the cache by a key of its own; a list measures only the tasks none holds, and
    its table is the one a measurement from scratch gives."""
    from mneme_plugin.groundtruth.harness import TASK_RESULTS_CACHE, _task_share, run_key

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for seed, (name, n) in enumerate({"toy_animals": 8, "toy_roads": 6, "toy_plants": 7}.items()):
        write_lm_eval_task(tasks, name, n, seed=seed)
    write_lm_eval_group(tasks, "toys", ["toy_animals", "toy_roads"])
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer, n_layers=2, hidden_size=32)
    edited = save_finetuned_llama(base, tmp_path / "edited", synthetic_corpus(40, seed=5), steps=30, lr=1e-2)
    cfg = LMEvalConfig(base=str(base), edited=str(edited), tasks=["toys"], include_path=[str(tasks)],
                       include_defaults=False, batch_size=8, device="cpu")
    cache = tmp_path / "cache"
    shares = cache / RESULTS_CACHE / TASK_RESULTS_CACHE
    # A share's key is the list's key for its task alone: what measuring that task by itself would be keyed by.
    assert _task_share(cache, run_key(cfg, str(base)), "toy_roads")[1] == run_key(cfg.replace(tasks=["toy_roads"]), str(base))
    lm_eval_ground_truth(cfg, tmp_path / "gt1")  # measured without a cache (or by an earlier version) ...
    dates = [json.loads((tmp_path / "gt1" / name).read_text())["date"] for name in RESULTS_JSON.values()]
    lm_eval_ground_truth(cfg, tmp_path / "gt1", cache_dir=cache)  # ... found again: its shares are kept
    assert [json.loads((tmp_path / "gt1" / name).read_text())["date"] for name in RESULTS_JSON.values()] == dates
    assert len(list(shares.glob("*.json"))) == 4  # two tasks x two models
    stamps = {p.name: p.stat().st_mtime_ns for p in shares.glob("*.json")}

    grown = cfg.replace(tasks=["toys", "toy_plants"])
    table = lm_eval_ground_truth(grown, tmp_path / "gt2", cache_dir=cache).sort_values("task").reset_index(drop=True)
    assert {p.name: p.stat().st_mtime_ns for p in shares.glob("*.json") if p.name in stamps} == stamps
    assert len(list(shares.glob("*.json"))) == 6
    for side in RESULTS_JSON:  # lm-eval ran toy_plants alone for each model (its request cache says which)
        (requests,) = (tmp_path / "gt2" / "cache").glob(f"lm_eval_{side}_*")
        assert requests.exists()
    after = json.loads((tmp_path / "gt2" / RESULTS_JSON["after"]).read_text())
    assert sorted(after["n-samples"]) == ["toy_animals", "toy_plants", "toy_roads"]
    scratch = lm_eval_ground_truth(grown, tmp_path / "scratch").sort_values("task").reset_index(drop=True)
    pd.testing.assert_frame_equal(table, scratch)

    # A list whose every task is held: nothing is evaluated.
    alone = lm_eval_ground_truth(cfg.replace(tasks=["toy_roads"]), tmp_path / "gt3", cache_dir=cache)
    assert not (tmp_path / "gt3" / "cache").exists()
    pd.testing.assert_frame_equal(alone.reset_index(drop=True),
                                  scratch[scratch["task"] == "toy_roads"].reset_index(drop=True))


def test_the_run_key_holds_the_dtype_the_models_are_loaded_in(tmp_path):
    """``dtype: auto`` is float32 on a CPU and bfloat16 on a GPU: the key holds the resolved dtype, so
    a result measured on one device class is not reused on the other (``device`` itself is not in the key)."""
    import torch

    from mneme_plugin.groundtruth.harness import run_key

    cfg = LMEvalConfig(base="b", edited="e", tasks=["toy"], device="cpu")
    key = run_key(cfg, "b")
    assert key["dtype"] == "float32"
    assert run_key(cfg.replace(dtype="float32"), "b") == key
    assert run_key(cfg.replace(dtype="bfloat16"), "b") != key
    assert run_key(cfg.replace(model_args={"dtype": "bfloat16"}), "b")["dtype"] == "bfloat16"
    if torch.cuda.is_available():
        on_gpu = run_key(cfg.replace(device="cuda"), "b")
        assert on_gpu != key and on_gpu == run_key(cfg.replace(device="cuda:0", dtype="bfloat16"), "b")
    else:
        assert run_key(cfg.replace(device="auto"), "b") == key


def test_lm_eval_bad_input(tmp_path, tiny_tokenizer):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "toy_animals", 4, seed=0)
    base = save_tiny_llama(tmp_path / "base", tiny_tokenizer)
    cfg = LMEvalConfig(base=str(base), edited=str(base), tasks=["toy_animls"], include_path=[str(tasks)],
                       include_defaults=False)
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / SCORES_CSV).write_text("category,before,after\nanimals,0.5,0.4\n")  # an earlier measurement's
    with pytest.raises(ConfigError, match="does not know task.*toy_animals"):
        lm_eval_ground_truth(cfg, tmp_path / "gt")
    assert not (tmp_path / "gt" / SCORES_CSV).exists()  # not left beside this config as if it were its table
    with pytest.raises(ConfigError, match="needs `tasks`"):
        lm_eval_ground_truth(LMEvalConfig(base="b", edited="e"), tmp_path / "gt")
    # A folder that is no model, as the edited one: refused before the base model is evaluated.
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = LMEvalConfig(base=str(base), edited=str(empty), tasks=["toy_animals"], include_path=[str(tasks)],
                       include_defaults=False, device="cpu")
    with pytest.raises(ConfigError, match="lm-eval edited: the model folder .*empty is empty"):
        lm_eval_ground_truth(cfg, tmp_path / "gt2")
    assert not (tmp_path / "gt2").exists()
    # Results produced elsewhere: only the group rows of an MMLU-Pro-like file lack sample counts.
    before = {"results": {"mmlu_pro": {"exact_match,custom-extract": 0.5},
                          "mmlu_pro_law": {"exact_match,custom-extract": 0.4, "exact_match_stderr,custom-extract": 0.05}},
              "n-samples": {"mmlu_pro_law": {"effective": 100}}}
    after = json.loads(json.dumps(before))
    after["results"]["mmlu_pro_law"]["exact_match,custom-extract"] = 0.2
    table = table_from_results(before, after)
    assert table[["category", "before", "after", "n", "test"]].values.tolist() == [["law", 0.4, 0.2, 100, "z"]]
    # A task in one file only (results of another task list) was left out without a word.
    with pytest.raises(ConfigError, match=r"of different tasks: The before lm-eval results has \['mmlu_pro_law'\]; "
                                          r"The after lm-eval results has \['other'\], which the other lacks"):
        table_from_results(before, {"results": {"other": {"acc,none": 1.0}}})
    more = json.loads(json.dumps(after))
    more["results"]["mmlu_pro_math"] = {"exact_match,custom-extract": 0.3}
    more["n-samples"]["mmlu_pro_math"] = {"effective": 50}
    with pytest.raises(ConfigError, match=r"The after lm-eval results has \['mmlu_pro_math'\], which the other lacks"):
        table_from_results(before, more)


def test_lm_eval_reads_a_cached_hub_model_from_the_cache_when_the_hub_cannot_be_reached(tmp_path, tiny_tokenizer,
                                                                                        hub_cache):
    """HF_HUB_OFFLINE unset, the hub unreachable (a local port nothing listens on): lm-eval loads a hub id
    the local hub cache holds from there, with the one log line, not after the hub client's retries."""
    import os
    import socket
    import subprocess
    from pathlib import Path

    _, edited, tasks = _hub_base_local_edited_and_task(tmp_path, tiny_tokenizer, hub_cache, commit="d" * 40)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": endpoint,
           "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code = ("from mneme_plugin.groundtruth.harness import LMEvalConfig, lm_eval_ground_truth\n"
            f"cfg = LMEvalConfig(base='someone/tiny-base', edited={str(edited)!r}, tasks=['toy_animals'], "
            f"include_path=[{str(tasks)!r}], include_defaults=False, batch_size=8, device='cpu')\n"
            f"print(len(lm_eval_ground_truth(cfg, {str(tmp_path / 'gt')!r})))\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Retrying" not in run.stderr, run.stderr[-3000:]
    assert (f"The hub ({endpoint}) cannot be reached" in run.stderr
            and f"loading someone/tiny-base from the local Hugging Face cache, commit {'d' * 40}" in run.stderr)


def test_local_task_size_counts_the_rows_of_the_split_lm_eval_evaluates(tmp_path):
    """JSON lines, a JSON array, CSV (less its header) and Parquet files of the evaluated split, checked against
    the documents lm-eval's own task builds from the same YAML; a hub dataset or a missing file gives None."""
    import pandas as pd
    from lm_eval.tasks import TaskManager

    from mneme_plugin.groundtruth.harness import local_task_size

    rows = [{"q": f"the cat sees {i}", "choices": ["a", "b"], "answer": i % 2} for i in range(9)]
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "array.json").write_text(json.dumps(rows[:5]))
    pd.DataFrame({"q": [r["q"] for r in rows[:4]], "answer": [0] * 4}).to_csv(tmp_path / "table.csv", index=False)
    pd.DataFrame({"q": [r["q"] for r in rows[:6]], "answer": [0] * 6}).to_parquet(tmp_path / "table.parquet")
    body = ("output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: [\"a\", \"b\"]\n"
            "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    specs = {"t_lines": ("json", f"{{test: {tmp_path / 'lines.jsonl'}, validation: {tmp_path / 'array.json'}}}", "test"),
             "t_array": ("json", str(tmp_path / "array.json"), "train"),
             "t_val": ("json", f"{{validation: [{tmp_path / 'array.json'}, {tmp_path / 'lines.jsonl'}]}}", None),
             "t_csv": ("csv", f"{{test: {tmp_path / 'table.csv'}}}", "test"),
             "t_parquet": ("parquet", f"{{test: {tmp_path / 'table.parquet'}}}", "test")}
    for name, (builder, files, split) in specs.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: {builder}\ndataset_kwargs:\n  data_files: {files}\n"
            + (f"test_split: {split}\n" if split else "validation_split: validation\n") + body)
    (tmp_path / "t_missing.yaml").write_text(f"task: t_missing\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {tmp_path / 'gone.jsonl'}\ntest_split: test\n" + body)
    (tmp_path / "t_hub.yaml").write_text("task: t_hub\ndataset_path: cais/wmdp\ndataset_name: wmdp-bio\ntest_split: test\n" + body)
    config = LMEvalConfig(base="b", edited="e", tasks=list(specs), include_path=[str(tmp_path)], include_defaults=False)
    sizes = {name: local_task_size(config, name) for name in [*specs, "t_missing", "t_hub", "not_a_task"]}
    assert sizes == {"t_lines": 9, "t_array": 5, "t_val": 14, "t_csv": 4, "t_parquet": 6, "t_missing": None,
                     "t_hub": None, "not_a_task": None}
    # lm-eval's own tasks agree (the CSV and Parquet tasks read text only; the counts are what matters here).
    built = TaskManager(include_path=str(tmp_path), include_defaults=False).load_task_or_group(["t_lines", "t_array", "t_val"])
    documents = {name: len(list(task.eval_docs)) for name, task in built.items()}
    assert documents == {"t_lines": 9, "t_array": 5, "t_val": 14}, documents
