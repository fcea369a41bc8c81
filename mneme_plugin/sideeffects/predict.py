"""From attributed latents and their categories to predicted affected categories, with evidence."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_write, atomic_write_text, read_json, records_problem, require_json_shape
from mneme_plugin.interpret.mapping import LINK_COLUMNS
from mneme_plugin.sideeffects.config import CONTROL_RULES, PredictConfig
from mneme_plugin.sideeffects.enrichment import benjamini_hochberg, enrichment_table
from mneme_plugin.sideeffects.shift import broad_change_pvalue, changed_share, homogeneity_pvalue

logger = logging.getLogger("mneme_plugin")

SCORES_CSV = "category_scores.csv"
PREDICTIONS_JSON = "predictions.json"


def evidence_contribution(item: Mapping[str, Any]) -> float:
    """What one evidence item (a latent's link to a category) adds to that category's score."""
    return abs(item["attribution_score"]) * item["similarity"]


@dataclass
class Prediction:
    """Per-category scores (``scores``: one row per taxonomy category) and the predicted set."""

    scores: pd.DataFrame
    predicted: list[str]
    evidence: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    config: PredictConfig = field(default_factory=PredictConfig)
    # The rule's whole-taxonomy tests and verdict (``outlier_or_broad``: concentration and breadth p-values)
    tests: dict[str, Any] = field(default_factory=dict)
    # The name of the taxonomy the categories belong to (None: not recorded, as in files written before it was)
    taxonomy: str | None = None

    def latents_behind(self, categories: Collection[str] | None = None) -> list[int]:
        """The latents whose evidence supports ``categories`` (default: the predicted ones), strongest
        contribution first, each once: what remediation retrains on (``RemediateConfig.target``). Only
        the evidence of the side the prediction scored (``config.side``; both sides' for ``both``): a
        latent of the other side is linked to the category but adds nothing to its score."""
        wanted = self.predicted if categories is None else list(categories)
        items = [e for c in wanted for e in self.evidence.get(c, [])
                 if self.config.side == "both" or e.get("side") == self.config.side]
        items.sort(key=evidence_contribution, reverse=True)
        return list(dict.fromkeys(int(e["latent"]) for e in items))

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"taxonomy": self.taxonomy} if self.taxonomy else {}),
            "predicted": self.predicted,
            "config": self.config.to_dict(),
            "tests": self.tests,
            "scores": self.scores.to_dict(orient="records"),
            "evidence": self.evidence,
        }


def _check_columns(frame: pd.DataFrame, needed: Iterable[str], what: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ConfigError(f"The {what} lacks columns {missing}; it has {list(frame.columns)}.")


def predict(
    attribution: pd.DataFrame | Any,
    links: pd.DataFrame,
    categories: Iterable[str],
    config: PredictConfig | None = None,
    descriptions: Mapping[int, str] | None = None,
    reference: Collection[int] | None = None,
    control: pd.DataFrame | None = None,
) -> Prediction:
    """Score every category of the taxonomy and predict the affected ones.

    ``attribution``: the attribution table (``latent``, ``latent_class``, ``score``), or the ``AttributionResult``
    holding it (``load_attribution``).
    ``links``: latent-to-category links in long form (``latent``, ``category``, ``similarity``),
    as the mapping stage writes them, several per latent, any order.
    ``categories``: every category of the taxonomy (categories without evidence score 0).
    ``reference``: a uniform sample of the live latents, mapped (the ``enrichment`` rule's null;
    without it, every mapped latent stands in for the live ones).
    ``control``: the attribution table of a control crosscoder (base vs a benignly perturbed copy),
    the ``outlier_or_broad`` rule's scale for a broad change; without it a broad change is not tested.
    """
    cfg = PredictConfig.of(config)
    from mneme_plugin.attribution.table import AttributionResult

    if isinstance(attribution, AttributionResult):
        attribution = attribution.table
    _check_columns(attribution, ("latent", "latent_class", "score"), "attribution table")
    _check_columns(links, LINK_COLUMNS, "category links table")
    all_categories = list(dict.fromkeys(categories))
    unknown = sorted(set(links["category"]) - set(all_categories))
    if unknown:
        raise ConfigError(f"Links name categories outside the taxonomy: {unknown[:5]}.")

    sides = cfg.side_classes()
    top_links = (
        # A link of similarity 0 is no link: the lexical mapper scores 0 for a description sharing no
        # word with any category, and its "nearest" category is then just the taxonomy's first.
        links[(links["similarity"] > 0) & (links["similarity"] >= cfg.min_similarity)]
        .sort_values(["latent", "similarity"], ascending=[True, False], kind="stable")
        .groupby("latent", sort=False)
        .head(cfg.categories_per_latent)
    )
    scores = pd.DataFrame({"category": all_categories}).set_index("category")
    evidence: dict[str, list[dict[str, Any]]] = {c: [] for c in all_categories}
    side_latents: dict[str, list[int]] = {}
    for side, classes in sides.items():
        latents = attribution[attribution["latent_class"].isin(classes)].copy()
        latents["weight"] = latents["score"].abs()
        latents = latents.sort_values("weight", ascending=False, kind="stable")
        if cfg.max_latents is not None:
            latents = latents.head(cfg.max_latents)
        side_latents[side] = latents["latent"].astype(int).tolist()
        joined = latents.merge(top_links, on="latent", how="inner")
        joined["contribution"] = joined["weight"] * joined["similarity"]
        grouped = joined.groupby("category")
        scores[f"{side}_score"] = grouped["contribution"].sum().reindex(scores.index).fillna(0.0)
        scores[f"n_{side}_latents"] = grouped["latent"].nunique().reindex(scores.index).fillna(0).astype(int)
        for row in joined.itertuples(index=False):
            evidence[row.category].append({
                "side": side, "latent": int(row.latent), "class": row.latent_class,
                "attribution_score": float(row.score), "similarity": float(row.similarity),
                "description": (descriptions or {}).get(int(row.latent), ""),
            })
    if cfg.side == "both":
        scores["score"] = scores["suppressed_score"] + scores["amplified_score"]
        support = scores["n_suppressed_latents"] + scores["n_amplified_latents"]
    else:
        scores["score"] = scores[f"{cfg.side}_score"]
        support = scores[f"n_{cfg.side}_latents"]
    eligible = (support >= cfg.min_latents) & (scores["score"] > 0)
    tests: dict[str, Any] = {}
    if cfg.rule == "outlier" or cfg.rule in CONTROL_RULES:
        median = float(scores["score"].median())
        mad = float((scores["score"] - median).abs().median())
        # A floor on the spread: when most categories score exactly the same (e.g. 0), MAD is 0.
        spread = max(1.4826 * mad, 1e-3 * max(float(scores["score"].abs().max()), 1e-12))
        scores["robust_z"] = (scores["score"] - median) / spread
        chosen = eligible & (scores["robust_z"] >= cfg.outlier_z)
        if cfg.rule in CONTROL_RULES:
            chosen, tests = _outlier_or_broad(chosen, attribution, top_links, reference, control, cfg)
    elif cfg.rule == "enrichment":
        if not reference:
            logger.warning("No reference sample of live latents (collect.reference_latents): the enrichment rule "
                           "compares each side with the other mapped latents instead.")
            reference = set(top_links["latent"].astype(int))
        tested = list(side_latents) if cfg.side == "both" else [cfg.side]
        table = enrichment_table(top_links, {s: side_latents[s] for s in tested}, reference, all_categories)
        table = table.set_index("category")
        for column in table.columns:
            if not column.startswith("n_"):
                scores[column] = table[column]
        chosen = pd.Series(False, index=scores.index)
        for s in tested:
            chosen |= (table[f"q_{s}"] <= cfg.alpha) & (table[f"n_{s}"] >= cfg.min_latents)
    elif cfg.rule == "relative":
        best = scores.loc[eligible, "score"].max() if eligible.any() else 0.0
        chosen = eligible & (scores["score"] >= cfg.relative_threshold * best)
    elif cfg.rule == "top_k":
        ranked = scores[eligible].sort_values("score", ascending=False, kind="stable")
        chosen = scores.index.isin(ranked.index[: cfg.k])
    elif cfg.rule == "min_score":
        chosen = eligible & (scores["score"] >= cfg.min_score)
    else:  # a rule added to RULES without its branch here would otherwise predict as another rule
        raise ConfigError(f"Rule {cfg.rule!r} is registered (sideeffects.config.RULES) but predict has no branch for it.")
    scores["predicted"] = chosen
    scores = scores.reset_index().sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    predicted = scores.loc[scores["predicted"], "category"].tolist()
    for items in evidence.values():
        items.sort(key=evidence_contribution, reverse=True)
    return Prediction(scores=scores, predicted=predicted, evidence=evidence, config=cfg, tests=tests)


def _outlier_or_broad(outliers: pd.Series, attribution: pd.DataFrame, top_links: pd.DataFrame,
                      reference: Collection[int] | None, control: pd.DataFrame | None,
                      cfg: PredictConfig) -> tuple[pd.Series, dict[str, Any]]:
    """The ``outlier_or_broad`` decision (tests in ``sideeffects.shift``): the outlier categories when
    the changed latents concentrate on some categories; when the change is spread evenly and broader
    than the control's, the categories whose own share of changed latents exceeds the control's;
    nothing otherwise. ``outlier_plus_broad`` adds the latter to the former when a concentrated change
    is also broader than the control's. Without a control, the outlier rule's answer."""
    if control is None:
        return outliers, {"verdict": "no control: the outlier rule"}
    classes = cfg.changed_classes()
    live = attribution[attribution["latent_class"] != "dead"]
    population = set(live["latent"].astype(int))
    if reference:
        population &= {int(v) for v in reference}
    linked = top_links[top_links["latent"].astype(int).isin(population)].drop_duplicates("latent")
    is_changed = linked["latent"].map(live.set_index("latent")["latent_class"].isin(classes))
    homogeneity = homogeneity_pvalue(linked["category"].tolist(), is_changed.tolist(), cfg.permutations, cfg.seed)
    per_category = linked.groupby("category")["latent"].nunique().reindex(outliers.index).fillna(0)
    tests: dict[str, Any] = {"concentration_p": homogeneity, "reference_latents": len(linked),
                             "changed_reference_latents": int(is_changed.sum())}
    changed, n_live = changed_share(attribution, classes)
    tests.update(changed_latents=changed, live_latents=n_live)
    _check_columns(control, ("latent", "latent_class"), "control attribution table")
    control_changed, control_live = changed_share(control, classes)
    tests.update(control_changed_latents=control_changed, control_live_latents=control_live,
                 breadth_p=broad_change_pvalue(changed, n_live, control_changed, control_live))
    broader = tests["breadth_p"] <= cfg.alpha

    def broad_categories() -> pd.Series:
        # Which categories share the broad change: each one's changed share against the control's,
        # Fisher's exact test per category, Benjamini-Hochberg over the taxonomy.
        changed_per_category = linked.assign(changed=is_changed.to_numpy()).groupby("category")["changed"].sum()
        changed_per_category = changed_per_category.reindex(outliers.index).fillna(0).astype(int)
        p_values = [broad_change_pvalue(int(changed_per_category[c]), int(per_category[c]), control_changed, control_live)
                    for c in outliers.index]
        q_values = pd.Series(benjamini_hochberg(p_values), index=outliers.index)
        tests["broad_q"] = {c: float(q) for c, q in q_values.items()}
        return (q_values <= cfg.alpha) & (per_category >= cfg.min_latents)

    if homogeneity <= cfg.alpha and outliers.any():
        if cfg.rule == "outlier_plus_broad" and broader:
            chosen = outliers | broad_categories()
            tests["verdict"] = "concentrated and broad"
            return chosen, tests
        tests["verdict"] = "concentrated"
        return outliers, tests
    if broader:
        chosen = broad_categories()
        tests["verdict"] = "broad"
        return chosen, tests
    tests["verdict"] = "no change beyond the control"
    return pd.Series(False, index=outliers.index), tests


def save_prediction(prediction: Prediction, out_dir: str | os.PathLike[str]) -> Path:
    out = Path(out_dir)
    atomic_write(out / SCORES_CSV, lambda tmp: prediction.scores.to_csv(tmp, index=False))
    atomic_write_text(out / PREDICTIONS_JSON, json.dumps(prediction.to_dict(), indent=2))
    count = len(prediction.predicted)
    logger.info("Predictions written to %s (%d categor%s predicted).", out / PREDICTIONS_JSON, count,
                "y" if count == 1 else "ies")
    return out


def load_prediction(out_dir: str | os.PathLike[str]) -> Prediction:
    """The prediction written by ``save_prediction``."""
    from mneme_plugin.errors import CheckpointError

    path = Path(out_dir) / PREDICTIONS_JSON
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: run the predict stage (`mneme predict`) first.")
    remedy = "predict again (`mneme predict`)"
    data = require_json_shape(path, read_json(path, remedy),
                              {"predicted": list, "scores": list, "evidence": dict, "config": dict}, remedy)
    problem = records_problem(data["scores"], ("category", "score", "predicted"))
    if problem:
        raise CheckpointError(f"{path} is not a stage's file: its scores {problem}; {remedy}.")
    try:
        config = PredictConfig.from_dict(data["config"], section=f"{path}'s config")
    except ConfigError as err:
        raise CheckpointError(f"{path} is not a stage's file: {err} ({remedy}).") from err
    tests, taxonomy = data.get("tests", {}), data.get("taxonomy")
    return Prediction(
        scores=pd.DataFrame(data["scores"]), predicted=list(data["predicted"]),
        evidence=data["evidence"], config=config, tests=tests if isinstance(tests, dict) else {},
        taxonomy=taxonomy if isinstance(taxonomy, str) and taxonomy else None,
    )
