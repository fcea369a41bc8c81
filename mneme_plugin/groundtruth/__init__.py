"""Ground truth of side effects: per-category scores before and after an edit.

``table``: the one table format (category, before, after[, n]) that every ground truth ends in and
``evaluate`` reads, with its readers (CSV, lm-eval results JSON: ``table_from_results``) and writer, and the drops' tests.
``accuracy``: the model organism's cloze benchmark. ``harness``: lm-evaluation-harness on HF
models (:func:`lm_eval_ground_truth`). ``judge``: an LLM judge of behaviour (:func:`judge_ground_truth`)."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.groundtruth.accuracy": ("MODES", "accuracy_drop", "domain_accuracy", "question_correct"),
    "mneme_plugin.groundtruth.table": (
        "SCORES_CSV",
        "GroundTruthConfig",
        "category_from_task",
        "drop_test",
        "fisher_drop_p",
        "load_ground_truth",
        "make_table",
        "mcnemar_p",
        "read_lm_eval_results",
        "read_results_json",
        "read_scores_csv",
        "save_scores",
        "scores_dict",
        "scores_from_lm_eval",
        "scores_table",
        "table_from_results",
        "z_test_p",
    ),
    "mneme_plugin.groundtruth.harness": (
        "LMEvalConfig", "lm_eval_ground_truth", "lm_eval_table_from_files",
    ),
    "mneme_plugin.groundtruth.judge": (
        "GeneratorConfig", "JudgeConfig", "judge_ground_truth", "weighted_score",
    ),
})
