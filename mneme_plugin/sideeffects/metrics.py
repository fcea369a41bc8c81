"""Set metrics of a prediction against the truly degraded categories, and the baselines.

Accuracy is the paper's Eq. 4: |true ∩ predicted| / |true| (the share of truly degraded
categories that were predicted, i.e. recall); precision, recall and F1 are the usual ones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from typing import Any

# How an undefined metric (NaN: Eq. 4 accuracy when nothing degraded, precision when nothing was
# predicted) is written wherever people read it: the CLI's tables, `mneme info`, the report. Files
# keep machine-readable values (an empty CSV cell, JSON null).
UNDEFINED = "n/a"


def metric_text(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals for people; ``UNDEFINED`` for NaN or None."""
    number = math.nan if value is None else float(value)
    return UNDEFINED if math.isnan(number) else f"{number:.{digits}f}"


def percent_text(value: Any) -> str:
    """A share as a whole percentage for people (``0.25`` -> ``25%``); ``UNDEFINED`` for NaN or None."""
    number = math.nan if value is None else float(value)
    return UNDEFINED if math.isnan(number) else f"{number:.0%}"


@dataclass
class SetMetrics:
    accuracy: float
    precision: float
    recall: float
    f1: float
    n_true: int
    n_predicted: int
    n_hit: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def set_metrics(true: Iterable[str], predicted: Iterable[str]) -> SetMetrics:
    """Eq. 4 accuracy, precision, recall and F1. Empty sets give NaN where a ratio is undefined."""
    t, p = set(true), set(predicted)
    hit = len(t & p)
    recall = hit / len(t) if t else math.nan
    precision = hit / len(p) if p else math.nan
    if math.isnan(recall) or math.isnan(precision) or precision + recall == 0:
        f1 = 0.0 if (t or p) and hit == 0 else math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return SetMetrics(recall, precision, recall, f1, len(t), len(p), hit)


def random_baseline(true: Collection[str], categories: Collection[str], p: float = 0.5, seeds: int = 1000,
                    seed: int = 0) -> SetMetrics:
    """Mean metrics of predicting each category independently with probability ``p``.

    NaN draws (an empty prediction has no precision) are left out of the means.
    """
    cats = sorted(categories)
    rng = random.Random(seed)
    runs = [set_metrics(true, [c for c in cats if rng.random() < p]) for _ in range(seeds)]

    def mean(name: str) -> float:
        values = [getattr(r, name) for r in runs if not math.isnan(getattr(r, name))]
        return sum(values) / len(values) if values else math.nan

    return SetMetrics(
        accuracy=mean("accuracy"), precision=mean("precision"), recall=mean("recall"), f1=mean("f1"),
        n_true=len(set(true)), n_predicted=round(mean("n_predicted")), n_hit=round(mean("n_hit")),
    )


def oracle_baseline(true: Collection[str]) -> SetMetrics:
    """Predicting exactly the degraded categories: the ceiling."""
    return set_metrics(true, true)
