"""Ground truth of side effects: per-category benchmark accuracy before and after an edit."""

from mneme_plugin.groundtruth.accuracy import (
    MODES,
    accuracy_drop,
    degraded,
    domain_accuracy,
    question_correct,
    read_scores,
    save_scores,
)

__all__ = ["MODES", "accuracy_drop", "degraded", "domain_accuracy", "question_correct", "read_scores", "save_scores"]
