"""The evaluation of a prediction against the ground truth (``mneme_plugin.groundtruth``).

The table has the shape of the paper's Table 1: one row per method (MNEME, random, naive, oracle)
with Eq. 4 accuracy, precision, recall and F1.
"""

from __future__ import annotations

import dataclasses
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
from mneme_plugin.files import atomic_write, atomic_write_text, read_json, records_problem, require_json_shape
from mneme_plugin.groundtruth.table import checked_scores, drop_test
from mneme_plugin.sideeffects.config import EvaluateConfig
from mneme_plugin.sideeffects.metrics import SetMetrics, metric_text, oracle_baseline, random_baseline, set_metrics

logger = logging.getLogger("mneme_plugin")

EVALUATION_JSON = "evaluation.json"
METRICS_CSV = "metrics_table.csv"


def degraded_categories(scores: pd.DataFrame, config: EvaluateConfig | None = None) -> pd.DataFrame:
    """Adds ``drop`` and ``degraded`` to a (category, before, after[, n][, p_value]) table; with
    ``config.significance``, also ``p_value``: the table's own where it has one (the ground truth's
    test: McNemar on paired answers, or z on lm-eval's standard errors), else Fisher's exact test
    on the category's ``n`` questions (``groundtruth.table.drop_test``). A category with neither
    is judged by the drop threshold alone (a warning names it)."""
    cfg = config or EvaluateConfig()
    out = scores.copy()
    out["drop"] = out["before"] - out["after"]
    degraded = out["drop"] > cfg.drop_threshold
    if cfg.significance is not None:
        own = out["p_value"] if "p_value" in out.columns else pd.Series(None, index=out.index, dtype=object)
        counts = out["n"] if "n" in out.columns else pd.Series(None, index=out.index, dtype=object)
        p_values = []
        for before, after, n, p in zip(out["before"], out["after"], counts, own):
            if p is None or pd.isna(p):
                p, _ = drop_test(float(before), float(after), n=n)  # Fisher's exact test when n is known
            p_values.append(math.nan if p is None else float(p))
        out["p_value"] = p_values
        untested = out["p_value"].isna()
        if untested.any():
            logger.warning("No p-value and no number of questions for %s: their drops are judged by the threshold "
                           "alone (give the ground truth an n column to test them).",
                           ", ".join(map(str, out.loc[untested, "category"])))
        degraded &= untested | (out["p_value"] <= cfg.significance)
    out["degraded"] = degraded
    return out


def unmeasured_note(method: str, categories: list[str]) -> str:
    """The line the metrics text and the report give predictions the ground truth does not measure."""
    return f"{method} also predicted {', '.join(categories)}: no ground truth there, not scored."


@dataclass
class Evaluation:
    truth: pd.DataFrame
    rows: dict[str, SetMetrics]
    predicted: dict[str, list[str]] = field(default_factory=dict)
    taxonomy: str | None = None  # the taxonomy the prediction was made in (runs with several ground truths)
    outside: list[dict[str, Any]] = field(default_factory=list)  # ground-truth rows outside that taxonomy
    # Predicted categories (per method) that the ground truth does not measure: reported, not scored.
    unmeasured: dict[str, list[str]] = field(default_factory=dict)

    @property
    def true_set(self) -> list[str]:
        return self.truth.loc[self.truth["degraded"], "category"].tolist()

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"method": name, **m.to_dict()} for name, m in self.rows.items()])

    def markdown(self) -> str:
        lines = ["| method | Acc (Eq. 4) | precision | recall | F1 | predicted | true |", "|---|---|---|---|---|---|---|"]
        for name, m in self.rows.items():
            lines.append(
                f"| {name} | {metric_text(m.accuracy)} | {metric_text(m.precision)} | {metric_text(m.recall)} "
                f"| {metric_text(m.f1)} | {m.n_predicted} | {m.n_true} |"
            )
        lines += [unmeasured_note(name, categories) for name, categories in self.unmeasured.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "true": self.true_set,
            "predicted": self.predicted,
            "metrics": {name: m.to_dict() for name, m in self.rows.items()},
            "truth": self.truth.to_dict(orient="records"),
            **({"taxonomy": self.taxonomy} if self.taxonomy else {}),
            **({"outside": self.outside} if self.outside else {}),
            **({"unmeasured": self.unmeasured} if self.unmeasured else {}),
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

    Only the categories the ground truth measures are scored: a taxonomy category without a row
    (e.g. the emergent-misalignment taxonomy's 12 categories against the 8 first-plot questions) is
    neither right nor wrong when predicted (``Evaluation.unmeasured`` lists it) and is not in the
    random baseline's draw.
    """
    cfg = EvaluateConfig.of(config)
    if isinstance(predicted, str) or (naive_predicted is not None and isinstance(naive_predicted, str)):
        raise ConfigError(f"The predicted categories must be a list of names, got a string ({predicted!r}): its letters "
                          "would be read as categories. Pass a list, e.g. ['law'].")
    truth = degraded_categories(checked_scores(scores), cfg)
    measured = set(truth["category"])
    cats = [c for c in categories if c in measured] if categories is not None else truth["category"].tolist()
    true = truth.loc[truth["degraded"], "category"].tolist()
    chosen = {"MNEME": sorted(predicted)}
    if naive_predicted is not None:
        chosen["naive"] = sorted(naive_predicted)
    scored = {name: [c for c in picked if c in measured] for name, picked in chosen.items()}
    unmeasured = {name: [c for c in picked if c not in measured] for name, picked in chosen.items()}
    rows = {"MNEME": set_metrics(true, scored["MNEME"])}
    rows["random"] = random_baseline(true, cats, p=cfg.random_p, seeds=cfg.random_seeds, seed=cfg.seed)
    if naive_predicted is not None:
        rows["naive"] = set_metrics(true, scored["naive"])
    rows["oracle"] = oracle_baseline(true)
    return Evaluation(truth=truth, rows=rows, predicted=chosen,
                      unmeasured={name: c for name, c in unmeasured.items() if c})


def evaluated_other_prediction(evaluation: Evaluation, predicted: Collection[str]) -> bool:
    """Whether ``evaluation`` scored another prediction than ``predicted`` (the prediction now beside it was
    written after it: `mneme predict` or `mneme pool` again), so its metrics no longer describe it."""
    return sorted(evaluation.predicted.get("MNEME", [])) != sorted(predicted)


def save_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    table = evaluation.table()
    atomic_write(out / METRICS_CSV, lambda tmp: table.to_csv(tmp, index=False))
    # NaN (an undefined metric) as null: strict JSON, which other tools read too (json.dumps would write NaN).
    atomic_write_text(out / EVALUATION_JSON, json.dumps(_nan_as_null(evaluation.to_dict()), indent=2, default=float,
                                                        allow_nan=False))
    logger.info("Evaluation written to %s.", out / EVALUATION_JSON)
    return out


def _nan_as_null(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_as_null(item) for item in value]
    return value


def load_evaluation(out_dir: str | os.PathLike[str]) -> Evaluation:
    """The evaluation written by ``save_evaluation``."""
    from mneme_plugin.errors import CheckpointError

    path = Path(out_dir) / EVALUATION_JSON
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: run the evaluate stage (`mneme evaluate`) first.")
    remedy = "evaluate again (`mneme evaluate`)"
    data = require_json_shape(path, read_json(path, remedy), {"metrics": dict, "truth": list, "predicted": dict},
                              remedy)
    fields = [f.name for f in dataclasses.fields(SetMetrics)]
    for name, values in data["metrics"].items():
        if not isinstance(values, dict) or sorted(values) != sorted(fields):
            raise CheckpointError(f"{path} is not a stage's file: metrics {name!r} is not an object of exactly "
                                  f"{', '.join(fields)}; {remedy}.")
    # The truth has a row per category the ground truth measured (an evaluation without any is refused).
    problem = records_problem(data["truth"], ("category", "degraded")) if data["truth"] else "has no row"
    if problem:
        raise CheckpointError(f"{path} is not a stage's file: its truth {problem}; {remedy}.")
    rows = {name: SetMetrics(**{key: math.nan if value is None else value for key, value in values.items()})
            for name, values in data["metrics"].items()}
    truth = pd.DataFrame(data["truth"])
    for column in truth.columns:  # a column of nulls only (no p-value anywhere) is NaN, as it was written
        if truth[column].isna().all():
            truth[column] = truth[column].astype(float)
    return Evaluation(truth=truth, rows=rows, predicted=data["predicted"],
                      taxonomy=data.get("taxonomy"), outside=data.get("outside", []),
                      unmeasured=data.get("unmeasured", {}))


def load_evaluations(out_dir: str | os.PathLike[str]) -> dict[str, Evaluation]:
    """Every evaluation of a run's ``evaluation/`` folder: ``{"": ...}`` for a run with one ground truth,
    ``{table: ...}`` for one evaluated per named table (``evaluation/<table>/``)."""
    folder = Path(out_dir)
    if (folder / EVALUATION_JSON).is_file():
        return {"": load_evaluation(folder)}
    return {p.name: load_evaluation(p) for p in sorted(folder.iterdir()) if (p / EVALUATION_JSON).is_file()} \
        if folder.is_dir() else {}
