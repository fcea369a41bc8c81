"""The evaluation of a prediction against the ground truth (``mneme_plugin.groundtruth``).

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

from mneme_plugin.files import atomic_write, atomic_write_text
from mneme_plugin.sideeffects.config import EvaluateConfig
from mneme_plugin.sideeffects.metrics import SetMetrics, oracle_baseline, random_baseline, set_metrics

logger = logging.getLogger("mneme_plugin")

EVALUATION_JSON = "evaluation.json"
METRICS_CSV = "metrics_table.csv"


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



def load_evaluation(out_dir: str | os.PathLike[str]) -> Evaluation:
    """The evaluation written by ``save_evaluation``."""
    from mneme_plugin.errors import CheckpointError

    path = Path(out_dir) / EVALUATION_JSON
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: run the evaluate stage (`mneme evaluate`) first.")
    data = json.loads(path.read_text())
    rows = {name: SetMetrics(**values) for name, values in data["metrics"].items()}
    return Evaluation(truth=pd.DataFrame(data["truth"]), rows=rows, predicted=data["predicted"])
