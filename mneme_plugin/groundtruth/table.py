"""The ground-truth table: per-category scores before and after the edit, its readers and its writer.

This is the one format every ground truth ends in (the organism's cloze benchmark, lm-eval runs,
LLM-judge rates) and the one that ``evaluate`` reads: a CSV with columns ``category``, ``before``,
``after`` and optionally ``n`` (questions per category) and ``stderr``; extra columns are kept.
lm-eval results JSON files are read into the same table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mneme_plugin.config import ConfigMixin, require
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_write

SCORES_CSV = "ground_truth.csv"
REQUIRED_COLUMNS = ("category", "before", "after")
TASK_PREFIXES = ("mmlu_pro_", "mmlu_", "wmdp_")


@dataclass
class GroundTruthConfig(ConfigMixin):
    """Per-category scores before / after the edit: a scores CSV (category, before, after[, n]) or
    two lm-eval results JSON files (before, after)."""

    scores_csv: str | None = None
    lm_eval_before: str | None = None
    lm_eval_after: str | None = None

    def __post_init__(self) -> None:
        require(
            (self.lm_eval_before is None) == (self.lm_eval_after is None),
            "ground_truth.lm_eval_before and lm_eval_after go together.",
        )
        require(not (self.scores_csv and self.lm_eval_before), "Give ground_truth.scores_csv or the lm-eval pair, not both.")

    @property
    def available(self) -> bool:
        return bool(self.scores_csv or self.lm_eval_before)

    def files(self) -> list[str]:
        """The files this ground truth is read from."""
        return [p for p in (self.scores_csv, self.lm_eval_before, self.lm_eval_after) if p]


def scores_table(before: Mapping[str, float], after: Mapping[str, float],
                 n: Mapping[str, int] | None = None) -> pd.DataFrame:
    """The table from per-category scores (categories in ``before``'s order; both must cover the same)."""
    if set(before) != set(after):
        raise ConfigError(f"before and after cover different categories: {sorted(set(before) ^ set(after))}.")
    table = pd.DataFrame({"category": list(before), "before": [float(before[c]) for c in before],
                          "after": [float(after[c]) for c in before]})
    table["n"] = [n.get(c) for c in before] if n is not None else None
    return table


def save_scores(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the table as CSV (atomically)."""
    _check_table(table, Path(path))
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def _check_table(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"{path} lacks column(s) {missing}; a ground-truth table needs category, before, after[, n].")
    for column in ("before", "after", "n", "stderr"):
        if column not in table.columns:
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.loc[values.isna() & table[column].notna(), "category"].astype(str).tolist()
        if bad or (column in ("before", "after") and values.isna().any()):
            shown = bad or table.loc[values.isna(), "category"].astype(str).tolist()
            raise ConfigError(f"{path}: column {column!r} must hold numbers; categories {shown[:5]} do not.")
        table[column] = values
    duplicated = table["category"][table["category"].duplicated()].astype(str).tolist()
    if duplicated:
        raise ConfigError(f"{path}: categories {duplicated[:5]} appear more than once.")
    return table


def read_scores_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A ground-truth CSV: ``category``, ``before``, ``after`` and optionally ``n`` (and more columns)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Ground-truth file {path} does not exist.")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not a readable CSV file: {err}") from err
    table = _check_table(table, path)
    table["category"] = table["category"].astype(str).str.strip()
    if "n" not in table.columns:
        table["n"] = None
    return table


def category_from_task(task: str) -> str:
    """lm-eval task name to category: ``mmlu_high_school_biology`` -> ``high_school_biology``."""
    for prefix in TASK_PREFIXES:
        if task.startswith(prefix):
            return task[len(prefix):]
    return task


def read_lm_eval_results(path: str | os.PathLike[str], metric: str = "acc,none") -> pd.DataFrame:
    """Per-task score, standard error and sample count from an lm-eval results JSON: (category, score, stderr, n)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable lm-eval results JSON: {err}") from err
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise ConfigError(f"{path} has no 'results' mapping; is it an lm-eval results file?")
    samples = data.get("n-samples", {})
    stderr_key = metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr"
    rows = []
    for task, values in results.items():
        if not isinstance(values, dict) or metric not in values:
            continue
        n = samples.get(task, {}).get("effective") if isinstance(samples.get(task), dict) else None
        stderr = values.get(stderr_key)
        rows.append({"category": category_from_task(task), "score": float(values[metric]),
                     "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n})
    if not rows:
        raise ConfigError(f"{path} has no task with metric {metric!r}.")
    return pd.DataFrame(rows)


def scores_from_lm_eval(before: str | os.PathLike[str], after: str | os.PathLike[str]) -> pd.DataFrame:
    """The ground-truth table from two lm-eval results JSON files (tasks in both)."""
    b, a = read_lm_eval_results(before), read_lm_eval_results(after)
    merged = b.merge(a, on="category", suffixes=("_before", "_after"))
    if merged.empty:
        raise ConfigError(f"{before} and {after} share no task.")
    return pd.DataFrame({
        "category": merged["category"], "before": merged["score_before"], "after": merged["score_after"],
        "n": merged["n_before"],
    })


def load_ground_truth(config: GroundTruthConfig) -> pd.DataFrame:
    """The table named by a ``GroundTruthConfig``."""
    if not config.available:
        raise ConfigError("No ground truth: set ground_truth.scores_csv or lm_eval_before / lm_eval_after.")
    for path in config.files():
        if not Path(path).is_file():
            raise ConfigError(f"Ground-truth file {path} does not exist.")
    if config.scores_csv:
        return read_scores_csv(config.scores_csv)
    return scores_from_lm_eval(str(config.lm_eval_before), str(config.lm_eval_after))


def scores_dict(table: pd.DataFrame) -> tuple[dict[str, float], dict[str, float]]:
    """(before, after) per category, from a table."""
    return (dict(zip(table["category"], table["before"].astype(float))),
            dict(zip(table["category"], table["after"].astype(float))))
