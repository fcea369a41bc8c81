"""Side effects: predict affected categories from attributed latents, evaluate against ground truth."""

from mneme_plugin.sideeffects.config import EvaluateConfig, PredictConfig
from mneme_plugin.sideeffects.evaluate import (
    Evaluation,
    degraded_categories,
    evaluate,
    read_lm_eval_results,
    read_scores_csv,
    save_evaluation,
    scores_from_lm_eval,
)
from mneme_plugin.sideeffects.metrics import SetMetrics, oracle_baseline, random_baseline, set_metrics
from mneme_plugin.sideeffects.predict import Prediction, load_prediction, predict, save_prediction
from mneme_plugin.sideeffects.remediate import (
    RemediateConfig,
    RemediationResult,
    remediate,
    save_remediation,
    select_samples,
)

__all__ = [
    "EvaluateConfig",
    "Evaluation",
    "PredictConfig",
    "Prediction",
    "RemediateConfig",
    "RemediationResult",
    "SetMetrics",
    "degraded_categories",
    "evaluate",
    "load_prediction",
    "oracle_baseline",
    "predict",
    "random_baseline",
    "read_lm_eval_results",
    "read_scores_csv",
    "save_evaluation",
    "remediate",
    "save_prediction",
    "save_remediation",
    "select_samples",
    "scores_from_lm_eval",
    "set_metrics",
]
