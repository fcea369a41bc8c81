"""The per-category ground-truth table that ``mneme evaluate`` reads, and the tests on its drops.

Columns: ``category, before, after, drop, n`` (what ``read_scores_csv`` needs: category, before,
after, n), then ``stderr_before, stderr_after, p_value, test`` and free extra columns. ``before`` /
``after`` are scores where higher is better (accuracy; for behaviour, the rate of good answers),
so ``drop > 0`` always means the edit degraded the category.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.io import atomic_write

GROUND_TRUTH_CSV = "ground_truth.csv"
TABLE_COLUMNS = ["category", "before", "after", "drop", "n", "stderr_before", "stderr_after", "p_value", "test"]


def mcnemar_p(before: Sequence[float], after: Sequence[float]) -> float:
    """One-sided exact McNemar p-value of 'after is worse than before' on paired 0/1 outcomes."""
    worse = sum(1 for b, a in zip(before, after) if b > a)
    better = sum(1 for b, a in zip(before, after) if b < a)
    n = worse + better
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n


def z_test_p(before: float, after: float, stderr_before: float | None, stderr_after: float | None,
             n: float | None = None) -> float | None:
    """One-sided p-value of 'after < before' from the two standard errors (or, without them, the
    binomial standard errors of two proportions measured on n items each); None if neither is known."""
    if stderr_before is not None and stderr_after is not None and not (pd.isna(stderr_before) or pd.isna(stderr_after)):
        se = math.sqrt(stderr_before**2 + stderr_after**2)
    elif n:
        se = math.sqrt((before * (1 - before) + after * (1 - after)) / n)
    else:
        return None
    if se == 0:
        return 0.0 if before > after else 1.0
    return 0.5 * math.erfc((before - after) / se / math.sqrt(2))


def make_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The table from rows with at least category, before, after, n (drop added; column order fixed)."""
    frame = pd.DataFrame(list(rows))
    frame["drop"] = frame["before"] - frame["after"]
    for column in TABLE_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    extra = [c for c in frame.columns if c not in TABLE_COLUMNS]
    return frame[TABLE_COLUMNS + extra]


def save_table(table: pd.DataFrame, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def load_table(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path)
