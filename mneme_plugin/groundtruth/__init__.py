"""Ground truth of side effects: per-category scores before and after an edit.

* The CPU organism's cloze benchmark (``accuracy``).
* lm-evaluation-harness on HF models (``harness``: :func:`lm_eval_ground_truth`).
* An LLM judge of behaviour (``judge``: :func:`judge_ground_truth`).

Both HF paths write ``ground_truth.csv`` (``table``), the table ``mneme evaluate --scores-csv`` reads.
"""

from mneme_plugin.groundtruth.accuracy import (
    MODES,
    accuracy_drop,
    degraded,
    domain_accuracy,
    question_correct,
    read_scores,
    save_scores,
)
from mneme_plugin.groundtruth.harness import LMEvalConfig, lm_eval_ground_truth, lm_eval_table_from_files, table_from_results
from mneme_plugin.groundtruth.judge import GeneratorConfig, JudgeConfig, judge_ground_truth, weighted_score
from mneme_plugin.groundtruth.table import GROUND_TRUTH_CSV, load_table, make_table, mcnemar_p, save_table

__all__ = [
    "GROUND_TRUTH_CSV", "GeneratorConfig", "JudgeConfig", "LMEvalConfig", "MODES", "accuracy_drop", "degraded",
    "domain_accuracy", "judge_ground_truth", "lm_eval_ground_truth", "lm_eval_table_from_files", "load_table",
    "make_table", "mcnemar_p", "question_correct", "read_scores", "save_scores", "save_table", "table_from_results",
    "weighted_score",
]
