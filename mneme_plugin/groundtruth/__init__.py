"""Ground truth of side effects: per-category scores before and after an edit.

``table``: the one table format (category, before, after[, n]) that every ground truth ends in and
``evaluate`` reads, with its readers (CSV, lm-eval results JSON) and writer. ``accuracy``: the
model organism's cloze benchmark."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.groundtruth.accuracy": ("MODES", "accuracy_drop", "domain_accuracy", "question_correct"),
    "mneme_plugin.groundtruth.table": (
        "SCORES_CSV",
        "GroundTruthConfig",
        "category_from_task",
        "load_ground_truth",
        "read_lm_eval_results",
        "read_scores_csv",
        "save_scores",
        "scores_dict",
        "scores_from_lm_eval",
        "scores_table",
    ),
})
