"""Ground truth (per-category scores before / after the edit) and the evaluation table.

The table has the shape of the paper's Table 1: one row per method (MNEME, random, naive, oracle)
with Eq. 4 accuracy, precision, recall and F1.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.errors import ConfigError
from mneme_plugin.io import atomic_write, atomic_write_text
from mneme_plugin.sideeffects.config import EvaluateConfig
from mneme_plugin.sideeffects.metrics import SetMetrics, oracle_baseline, random_baseline, set_metrics

logger = logging.getLogger("mneme_plugin")

EVALUATION_JSON = "evaluation.json"
METRICS_CSV = "metrics_table.csv"
TASK_PREFIXES = ("mmlu_pro_", "mmlu_", "wmdp_")


def category_from_task(task: str) -> str:
    """lm-eval task name to category: ``mmlu_high_school_biology`` -> ``high_school_biology``."""
    for prefix in TASK_PREFIXES:
        if task.startswith(prefix):
            return task[len(prefix):]
    return task


def read_lm_eval_results(path: str | os.PathLike[str], metric: str = "acc,none") -> pd.DataFrame:
    """Per-task accuracy and sample count from an lm-eval results JSON: (category, score, n)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable lm-eval results JSON: {err}") from err
    results = data.get("results")
    if not isinstance(results, dict):
        raise ConfigError(f"{path} has no 'results' mapping; is it an lm-eval results file?")
    samples = data.get("n-samples", {})
    rows = []
    for task, values in results.items():
        if metric not in values:
            continue
        n = samples.get(task, {}).get("effective")
        rows.append({"category": category_from_task(task), "score": float(values[metric]), "n": n})
    if not rows:
        raise ConfigError(f"{path} has no task with metric {metric!r}.")
    return pd.DataFrame(rows)


def read_scores_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV with columns ``category``, ``before``, ``after`` and optionally ``n`` (questions)."""
    frame = pd.read_csv(path)
    missing = [c for c in ("category", "before", "after") if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path} lacks columns {missing}; expected category, before, after[, n].")
    if "n" not in frame.columns:
        frame["n"] = None
    return frame[["category", "before", "after", "n"]]


def scores_from_lm_eval(before: str | os.PathLike[str], after: str | os.PathLike[str]) -> pd.DataFrame:
    b, a = read_lm_eval_results(before), read_lm_eval_results(after)
    merged = b.merge(a, on="category", suffixes=("_before", "_after"))
    if merged.empty:
        raise ConfigError(f"{before} and {after} share no task.")
    return pd.DataFrame({
        "category": merged["category"], "before": merged["score_before"], "after": merged["score_after"],
        "n": merged["n_before"],
    })


def _one_sided_p(before: float, after: float, n: float) -> float:
    """p-value of 'after < before' for two proportions measured on the same n questions."""
    pooled = (before + after) / 2
    se = math.sqrt(max(2 * pooled * (1 - pooled) / n, 1e-300))
    z = (before - after) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def degraded_categories(scores: pd.DataFrame, config: EvaluateConfig | None = None) -> pd.DataFrame:
    """Adds ``drop`` and ``degraded`` to a (category, before, after[, n]) table."""
    cfg = config or EvaluateConfig()
    out = scores.copy()
    out["drop"] = out["before"] - out["after"]
    degraded = out["drop"] > cfg.drop_threshold
    if cfg.significance is not None:
        p_values = [
            _one_sided_p(b, a, n) if n is not None and not pd.isna(n) and n > 0 else 0.0
            for b, a, n in zip(out["before"], out["after"], out.get("n", [None] * len(out)))
        ]
        out["p_value"] = p_values
        degraded &= out["p_value"] < cfg.significance
    out["degraded"] = degraded
    return out


@dataclass
class Evaluation:
    truth: pd.DataFrame
    rows: dict[str, SetMetrics]
    predicted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def true_set(self) -> list[str]:
        return self.truth.loc[self.truth["degraded"], "category"].tolist()

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"method": name, **m.to_dict()} for name, m in self.rows.items()])

    def markdown(self) -> str:
        lines = ["| method | Acc (Eq. 4) | precision | recall | F1 | predicted | true |", "|---|---|---|---|---|---|---|"]
        for name, m in self.rows.items():
            lines.append(
                f"| {name} | {m.accuracy:.3f} | {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} | {m.n_predicted} | {m.n_true} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "true": self.true_set,
            "predicted": self.predicted,
            "metrics": {name: m.to_dict() for name, m in self.rows.items()},
            "truth": self.truth.to_dict(orient="records"),
        }


def evaluate(
    predicted: Collection[str],
    scores: pd.DataFrame,
    categories: Collection[str] | None = None,
    naive_predicted: Collection[str] | None = None,
    config: EvaluateConfig | None = None,
) -> Evaluation:
    """Metrics of MNEME's prediction and of the baselines against the degraded categories.

    ``scores``: (category, before, after[, n]); ``categories``: the taxonomy (default: the
    categories in ``scores``); ``naive_predicted``: the naive baseline's prediction (the
    categories the same mapper puts closest to a plain description of the intervention).
    """
    cfg = config or EvaluateConfig()
    truth = degraded_categories(scores, cfg)
    cats = list(categories) if categories is not None else truth["category"].tolist()
    true = truth.loc[truth["degraded"], "category"].tolist()
    rows = {"MNEME": set_metrics(true, predicted)}
    rows["random"] = random_baseline(true, cats, p=cfg.random_p, seeds=cfg.random_seeds, seed=cfg.seed)
    if naive_predicted is not None:
        rows["naive"] = set_metrics(true, naive_predicted)
    rows["oracle"] = oracle_baseline(true)
    chosen = {"MNEME": sorted(predicted)}
    if naive_predicted is not None:
        chosen["naive"] = sorted(naive_predicted)
    return Evaluation(truth=truth, rows=rows, predicted=chosen)


def save_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    table = evaluation.table()
    atomic_write(out / METRICS_CSV, lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_text(out / EVALUATION_JSON, json.dumps(evaluation.to_dict(), indent=2, default=float))
    logger.info("Evaluation written to %s.", out / EVALUATION_JSON)
    return out

