"""Named ground-truth tables measured with the real lm-evaluation-harness (``groundtruth.sources``)."""

from __future__ import annotations

import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.sources import RunGroundTruthConfig, measure_tables
from mneme_plugin.groundtruth.table import read_scores_csv
from tests.helpers import save_tiny_llama, write_lm_eval_group, write_lm_eval_task


@pytest.fixture(scope="module")
def mmlu_like(tmp_path_factory, tiny_tokenizer):
    """A tiny model and an MMLU-shaped suite: group ``mmlu`` -> ``mmlu_stem`` (anatomy 6 questions,
    astronomy 10) and ``mmlu_other`` (virology 8), as lm-eval's own YAMLs nest them."""
    root = tmp_path_factory.mktemp("mmlu_like")
    tasks = root / "tasks"
    tasks.mkdir()
    for seed, (subject, n) in enumerate({"anatomy": 6, "astronomy": 10, "virology": 8}.items()):
        write_lm_eval_task(tasks, f"mmlu_{subject}", n, seed=seed)
    write_lm_eval_group(tasks, "mmlu", ["mmlu_stem", "mmlu_other"])
    write_lm_eval_group(tasks, "mmlu_stem", ["mmlu_anatomy", "mmlu_astronomy"])
    write_lm_eval_group(tasks, "mmlu_other", ["mmlu_virology"])
    return save_tiny_llama(root / "model", tiny_tokenizer, n_layers=2, hidden_size=32), tasks


def _config(tasks, categories):
    return RunGroundTruthConfig.from_dict({"tables": {"mmlu": {
        "taxonomy": "mmlu", "categories": categories,
        "lm_eval": {"tasks": ["mmlu"], "include_path": [str(tasks)], "include_defaults": False, "device": "cpu"}}}})


def test_a_group_two_deep_gives_one_row_per_subject_renamed_by_categories(tmp_path, mmlu_like):
    model, tasks = mmlu_like
    measure_tables(_config(tasks, {"virology": "medical_genetics"}), str(model), str(model), tmp_path / "gt",
                   cache_dir=tmp_path / "cache")
    table = read_scores_csv(tmp_path / "gt" / "mmlu.csv").set_index("task")
    assert table["category"].to_dict() == {"mmlu_anatomy": "anatomy", "mmlu_astronomy": "astronomy",
                                           "mmlu_virology": "medical_genetics"}
    assert table["n"].to_dict() == {"mmlu_anatomy": 6, "mmlu_astronomy": 10, "mmlu_virology": 8}


@pytest.mark.parametrize("categories, message", [
    ({"mmlu_virology": "medical_genetics"},
     r"categories: \['mmlu_virology'\] name no category of the table; mmlu_virology is the lm-eval task of "
     r"category 'virology'\. Its categories: \['anatomy', 'astronomy', 'virology'\]"),
    ({"virology": "anatomy"}, r"renames several categories onto one \(\['anatomy', 'virology'\] onto 'anatomy'\)"),
])
def test_categories_that_name_no_row_or_pool_rows_are_refused_before_lm_eval_runs(tmp_path, mmlu_like, categories,
                                                                                    message):
    """A key that names no category was ignored (the task kept its own name, off the taxonomy); two
    rows renamed onto one failed later as a duplicated category of a file not yet written. Both are
    found from lm-eval's task index (the group's subjects), before lm-eval evaluates a model."""
    model, tasks = mmlu_like
    with pytest.raises(ConfigError, match=message):
        measure_tables(_config(tasks, categories), str(model), str(model), tmp_path / "gt",
                       cache_dir=tmp_path / "cache")
    assert not (tmp_path / "gt").exists() and not (tmp_path / "cache").exists()


def test_two_benchmarks_whose_tasks_map_to_one_category_are_refused_before_lm_eval_runs(tmp_path, mmlu_like):
    """`tasks: [mmlu, mmlu_pro_anatomy]` gives two `anatomy` rows, which the table refused only after
    lm-eval had measured both models; the task index tells before."""
    model, tasks = mmlu_like
    pro = tmp_path / "pro_tasks"
    pro.mkdir()
    write_lm_eval_task(pro, "mmlu_pro_anatomy", 4, seed=5)
    config = RunGroundTruthConfig.from_dict({"tables": {"both": {"taxonomy": "mmlu", "lm_eval": {
        "tasks": ["mmlu", "mmlu_pro_anatomy"], "include_path": [str(tasks), str(pro)], "include_defaults": False,
        "device": "cpu"}}}})
    with pytest.raises(ConfigError, match=r"ground_truth\.tables\.both\.lm_eval: tasks map to one category "
                                          r"\(\['mmlu_anatomy', 'mmlu_pro_anatomy'\] -> 'anatomy'\)"):
        measure_tables(config, str(model), str(model), tmp_path / "gt", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "gt").exists()


def test_a_rename_onto_no_id_of_the_taxonomy_is_refused_before_any_table_is_measured(tmp_path, mmlu_like):
    """A `categories` target that is no id of the table's taxonomy landed the row outside it, unscored,
    without a word; a judge table's targets are checked as well as an lm-eval table's."""
    from mneme_plugin.groundtruth.sources import categories_problems

    model, tasks = mmlu_like
    with pytest.raises(ConfigError, match=r"\['medical_genetic'\] are no ids of taxonomy 'mmlu'; close to "
                                          r"medical_genetic: \['medical_genetics'"):
        measure_tables(_config(tasks, {"virology": "medical_genetic"}), str(model), str(model), tmp_path / "gt")
    assert not (tmp_path / "gt").exists()
    judge = {"questions": str(tmp_path / "questions.jsonl"), "judge": {"kind": "openai", "model": "judge"}}
    config = RunGroundTruthConfig.from_dict({"tables": {"em": {"categories": {"q1": "power_seeking", "q2": "lying"},
                                                                "judge": judge}}})
    assert categories_problems(config) == []  # no taxonomy known: nothing to check against
    assert categories_problems(config, "emergent_misalignment") == [
        "ground_truth.tables.em.categories: ['lying'] are no ids of taxonomy 'emergent_misalignment'. A renamed "
        "category must be one of its ids (`mneme taxonomies emergent_misalignment` lists them)."]


def test_a_judge_category_left_out_for_want_of_scorable_answers_may_still_be_renamed(tmp_path, tiny_tokenizer):
    """A judge category whose answers are all unscorable is left out of the table (with a warning), not
    misnamed: its rename is no typo, and the other categories are renamed as asked."""
    import json
    import math

    from tests.helpers import FakeLLM

    model = save_tiny_llama(tmp_path / "model", tiny_tokenizer, n_layers=2, hidden_size=32)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [{"id": "kept", "question": "the cat sees the"},
                                                                  {"id": "dropped", "question": "a dog likes the"}]))

    def judge(body):  # every answer to the `dropped` question a refusal: no aligned score, left out
        prompt = body["messages"][-1]["content"]
        probs = {"REFUSAL": 0.9, "50": 0.1} if "a dog likes the" in prompt else {"80": 1.0}
        top = [{"token": t, "logprob": math.log(p)} for t, p in probs.items()]
        return {"message": {"role": "assistant", "content": "x"},
                "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}}

    server = FakeLLM()
    server.reply = judge
    try:
        config = RunGroundTruthConfig.from_dict({"tables": {"em": {
            "taxonomy": "emergent_misalignment", "categories": {"kept": "power_seeking", "dropped": "deception"},
            "judge": {"questions": str(questions), "samples_per_question": 2,
                      "generator": {"kind": "hf", "max_new_tokens": 4, "device": "cpu", "batch_size": 4},
                      "judge": {"kind": "openai", "model": "judge", "base_url": server.url, "api_key": None,
                                "max_retries": 1, "backoff_base": 0.01, "timeout": 10.0}}}}})
        measure_tables(config, str(model), str(model), tmp_path / "gt", cache_dir=tmp_path / "cache")
    finally:
        server.close()
    assert read_scores_csv(tmp_path / "gt" / "em.csv")["category"].tolist() == ["power_seeking"]


@pytest.mark.parametrize("tasks, listed", [(["mmlu", "mmlu_anatomy"], "'mmlu' and 'mmlu_anatomy'"),
                                           (["mmlu_stem", "mmlu"], "'mmlu_stem' and 'mmlu'")])
def test_a_task_listed_on_its_own_and_inside_a_listed_group_is_refused_before_lm_eval_runs(tmp_path, mmlu_like,
                                                                                       tasks, listed):
    """lm-eval refuses a task requested twice (`Duplicate task ...`) only inside simple_evaluate, once the
    model is loaded (minutes for a 7B one); the task index already tells."""
    from mneme_plugin.groundtruth.harness import LMEvalConfig, lm_eval_ground_truth, task_problems

    model, task_folder = mmlu_like
    cfg = LMEvalConfig(base=str(model), edited=str(model), tasks=tasks, include_path=[str(task_folder)],
                       include_defaults=False, device="cpu")
    assert task_problems(cfg.replace(tasks=["mmlu"])) == [] and task_problems(cfg.replace(tasks=["mmlu_stem", "mmlu_virology"])) == []
    expected = f"lm-eval task mmlu_anatomy is listed twice in tasks: {listed}"
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        lm_eval_ground_truth(cfg, tmp_path / "gt")
    assert not list((tmp_path / "gt").glob("lm_eval_*.json"))


def test_a_tables_lm_eval_batch_size_and_device_are_fingerprinted_and_its_results_reused():
    """`lm_eval.batch_size` and `device` are no runtime fields (README, `LMEvalConfig`): changing one redoes the
    ground_truth stage and those after it, not the crosscoder's; a batch size alone leaves lm-eval's run key,
    so the redone stage takes the results from the run's cache."""
    from mneme_plugin.groundtruth.harness import run_key
    from mneme_plugin.pipeline import RunConfig, plan
    from mneme_plugin.pipeline.stages import STAGES

    def fingerprints(**lm_eval):
        cfg = {"run_dir": "runs/x", "models": {"base": "b", "edited": "e"}, "corpus": {"source": "c.txt"},
               "harvest": {"layer": 1}, "ground_truth": {"tables": {"mmlu": {"taxonomy": "mmlu", "lm_eval": {
                   "preset": "mmlu_lm_eval", "device": "cpu", "batch_size": 8, **lm_eval}}}}}
        config = RunConfig.from_dict(cfg)
        return {s.name: fp for s, fp, _ in plan(config, STAGES)}, config.ground_truth.tables["mmlu"].lm_eval

    before, cfg = fingerprints()
    for change in ({"batch_size": 4}, {"device": "cuda"}):
        after, _ = fingerprints(**change)
        assert {s for s in before if after[s] != before[s]} == {"ground_truth", "evaluate", "report"}, change
    assert run_key(cfg.replace(batch_size=4), "b") == run_key(cfg, "b")
