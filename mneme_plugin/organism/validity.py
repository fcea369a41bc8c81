"""The method-validity grid: the organism over seeds x targets x interventions, every prediction
rule scored against the measured ground truth beside the random, naive and oracle baselines.

Each case is one ``mneme run`` (``demo.run_case``), cached and resumable in its own folder, so a
grid interrupted half-way picks up where it stopped. The rules are then scored offline on the
finished runs (prediction is cheap; the crosscoder and the mapping are shared by all rules).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mneme_plugin.errors import ConfigError
from mneme_plugin.organism.build import build_organism, with_agnostic_docs
from mneme_plugin.organism.catalog import BEHAVIOUR_INTERVENTIONS
from mneme_plugin.organism.demo import (
    CASE_RUN,
    DESCRIPTIONS,
    RECIPE_FILE,
    case_taxonomy,
    control_folder,
    run_case,
    run_control,
)
from mneme_plugin.sideeffects.config import EvaluateConfig, PredictConfig
from mneme_plugin.sideeffects.metrics import UNDEFINED, metric_text

logger = logging.getLogger("mneme_plugin")

METHOD_COLUMNS = ("accuracy", "precision", "recall", "f1")
DROP_THRESHOLD = 0.1  # a domain is degraded when its accuracy drops by more than this (the demo's definition)


@dataclass(frozen=True)
class GridCase:
    seed: int
    intervention: str
    target: str | None  # None: benign fine-tuning and the behaviour edits, which have no target domain

    @property
    def name(self) -> str:
        return f"seed{self.seed}/{self.intervention}-{self.target or 'mixed'}"


def grid_cases(seeds: list[int], targets: list[str], interventions: list[str]) -> list[GridCase]:
    """RMU and narrow fine-tuning once per (seed, target); benign fine-tuning and the behaviour edits
    (identity, insecure: their target is fixed) once per seed."""
    cases = []
    for seed in seeds:
        for intervention in interventions:
            for target in ([None] if intervention in ("benign", *BEHAVIOUR_INTERVENTIONS) else targets):
                cases.append(GridCase(seed, intervention, target))
    return cases


def run_grid_case(case: GridCase, out_dir: Path, progress: bool = False, agnostic_docs: int | None = None) -> Path:
    """Build (or reload) the case's organism and run the pipeline on it; returns the case folder.
    ``agnostic_docs``: documents of the task-agnostic slice the method reads (the organism's
    ``agnostic_docs`` by default; the models and the ground truth do not depend on it)."""
    organism = build_organism(case.seed, case.intervention, case.target or "law",
                              out_dir / f"seed{case.seed}" / "organism", progress=progress)
    if agnostic_docs is not None:
        organism = with_agnostic_docs(organism, case.seed, agnostic_docs)
    case_dir = out_dir / case.name
    control = control_dir(out_dir, case.seed, case.intervention in BEHAVIOUR_INTERVENTIONS)
    run_case(organism, case_dir, case.seed, progress, run_control(organism, control, case.seed, progress))
    return case_dir


CROSSCODER_SEED_STEP = 100  # extra crosscoders of a case train with seeds case.seed + 100, + 200, ...
PREDICT_STAGES = ["harvest", "train", "attribute", "collect", "explain", "map", "predict"]


def crosscoder_seeds(case: GridCase, n_crosscoders: int) -> list[int]:
    """Training seeds of the case's extra crosscoders (the stored run trains with ``case.seed``)."""
    return [case.seed + CROSSCODER_SEED_STEP * i for i in range(1, n_crosscoders)]


def extra_crosscoder_dir(case_dir: Path, training_seed: int) -> Path:
    return case_dir / f"crosscoder-seed{training_seed}" / CASE_RUN


def run_extra_crosscoders(case: GridCase, out_dir: Path, n_crosscoders: int, progress: bool = False) -> list[Path]:
    """The finished case's pipeline again, up to ``predict``, with other crosscoder training seeds
    (same models, corpus and settings): the runs whose predictions ``score_case`` pools."""
    import yaml

    from mneme_plugin.pipeline import run_pipeline
    from mneme_plugin.pipeline.config import RunConfig

    case_dir = out_dir / case.name
    recipe = yaml.safe_load((case_dir / RECIPE_FILE).read_text())
    runs = []
    for training_seed in crosscoder_seeds(case, n_crosscoders):
        config = {key: value for key, value in recipe.items() if key not in ("ground_truth", "evaluate")}
        config["run_dir"] = str(extra_crosscoder_dir(case_dir, training_seed))
        config["training"] = {**recipe["training"], "seed": training_seed}
        config["predict"] = {**recipe.get("predict", {}),
                             "control_run": str(control_dir(out_dir, case.seed, case.intervention in BEHAVIOUR_INTERVENTIONS)
                                                / CASE_RUN)}
        runs.append(run_pipeline(RunConfig.from_dict(config), only=PREDICT_STAGES, progress=progress).root)
    return runs


def control_dir(out_dir: Path, seed: int, behaviours: bool = False) -> Path:
    """The seed's control run folder, shared by all its cases (its crosscoder is the rules' scale);
    the behaviour cases' organism has its own base, hence its own control."""
    return out_dir / f"seed{seed}" / control_folder(behaviours)


def score_case(case: GridCase, case_dir: Path, rules: dict[str, PredictConfig],
               significance: float | None = None, n_crosscoders: int = 1) -> list[dict]:
    """Every rule's prediction on the finished case, evaluated with the baselines (one row per method).

    A domain is degraded when its accuracy drops by more than 0.1 (the demo's definition) and, with
    ``significance``, when the drop is also significant at that level given its number of questions.
    With ``n_crosscoders`` > 1, also each rule's predictions of the case's extra crosscoders
    (``run_extra_crosscoders``) pooled with the stored run's by majority vote (``sideeffects.pool``)."""
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.groundtruth.table import SCORES_CSV, read_scores_csv
    from mneme_plugin.interpret.config import MapConfig
    from mneme_plugin.interpret.contexts import load_reference_latents
    from mneme_plugin.interpret.mapping import category_links, load_mapping
    from mneme_plugin.interpret.taxonomy import load_taxonomy
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.evaluate import evaluate
    from mneme_plugin.sideeffects.pool import pool_predictions
    from mneme_plugin.sideeffects.predict import Prediction, predict
    from mneme_plugin.sideeffects.steps import naive_prediction

    taxonomy = load_taxonomy(case_taxonomy(case.intervention))

    def run_inputs(run_dir: Path) -> tuple["pd.DataFrame", "pd.DataFrame", list[int]]:
        """What a prediction reads from a finished run: attribution table, category links, reference latents."""
        layout = RunLayout(run_dir)
        return (load_attribution(layout.attribution).table, category_links(load_mapping(layout.mapping), taxonomy.name),
                load_reference_latents(layout.contexts))

    def run_prediction(inputs: tuple["pd.DataFrame", "pd.DataFrame", list[int]], rule: PredictConfig) -> "Prediction":
        attribution, links, reference = inputs
        return predict(attribution, links, taxonomy.ids(), rule, reference=reference, control=control)

    control_layout = RunLayout(control_dir(case_dir.parents[1], case.seed, case.intervention in BEHAVIOUR_INTERVENTIONS)
                               / CASE_RUN)
    control = load_attribution(control_layout.attribution).table if control_layout.attribution.is_dir() else None
    truth = read_scores_csv(case_dir / SCORES_CSV)
    description = DESCRIPTIONS[case.intervention].format(target=case.target or "mixed")
    evaluate_config = EvaluateConfig(drop_threshold=DROP_THRESHOLD, significance=significance, seed=case.seed)
    rows = []
    stored = run_inputs(case_dir / CASE_RUN)
    for index, (rule_name, rule) in enumerate(rules.items()):
        prediction = run_prediction(stored, rule)
        naive = naive_prediction(description, MapConfig(taxonomies=[taxonomy.name]), max(1, len(prediction.predicted)))
        evaluation = evaluate(prediction.predicted, truth, taxonomy.ids(), naive_predicted=naive, config=evaluate_config)
        for method, metrics in evaluation.rows.items():
            if method in ("random", "oracle") and index > 0:
                continue  # they do not depend on the rule (naive's size does)
            name = {"MNEME": rule_name, "naive": f"naive ({rule_name})"}.get(method, method)
            rows.append({"case": case.name, "seed": case.seed, "intervention": case.intervention,
                         "target": case.target or "mixed", "method": name, **metrics.to_dict(),
                         "predicted": ",".join(evaluation.predicted.get(method, [])),
                         "true": ",".join(evaluation.true_set)})
    if n_crosscoders > 1:
        runs = [case_dir / CASE_RUN] + [extra_crosscoder_dir(case_dir, s) for s in crosscoder_seeds(case, n_crosscoders)]
        missing = [str(r) for r in runs if not (r / "mapping").is_dir()]
        if missing:
            raise ConfigError(f"Extra crosscoder runs not finished: {missing[:2]}; run the grid with --crosscoders "
                              f"{n_crosscoders} (without --score-only) first.")
        inputs = [stored] + [run_inputs(r) for r in runs[1:]]
        for rule_name, rule in rules.items():
            pooled = pool_predictions([run_prediction(i, rule) for i in inputs], names=[str(r) for r in runs])
            evaluation = evaluate(pooled.predicted, truth, taxonomy.ids(), config=evaluate_config)
            metrics = evaluation.rows["MNEME"]
            rows.append({"case": case.name, "seed": case.seed, "intervention": case.intervention,
                         "target": case.target or "mixed",
                         "method": f"{rule_name}, pooled over {n_crosscoders} crosscoders", **metrics.to_dict(),
                         "predicted": ",".join(pooled.predicted), "true": ",".join(evaluation.true_set)})
    return rows


def remediation_rows(case: GridCase, case_dir: Path, significance: float | None = None) -> list[dict]:
    """Per degraded domain of a finished knowledge case: the share of the lost accuracy that remediation
    and the random-sample control won back. A case whose ground truth has degraded domains but that
    wrote no remediation record (its prediction named nothing, so ``target: predicted`` had nothing to
    retrain on) gives rows with ``remediated`` False and no recovered share; a case with neither gives
    none; a case whose prediction named something and that has no record (its remediation was
    stopped, or could not run) gives none, with a warning. With ``significance``, only the domains whose drop is also significant at that level (the
    evaluation's test on the case's ground truth, as ``score_case`` applies it)."""
    from mneme_plugin.groundtruth.table import SCORES_CSV
    from mneme_plugin.sideeffects.remediate import CONTROLLED_JSON, load_controlled_remediation

    if case.intervention in BEHAVIOUR_INTERVENTIONS:  # the behaviour cases have no remediation step
        return []
    if not (case_dir / CONTROLLED_JSON).is_file():
        if not (case_dir / SCORES_CSV).is_file():
            return []
        from mneme_plugin.sideeffects import load_prediction
        from mneme_plugin.sideeffects.predict import PREDICTIONS_JSON

        prediction = case_dir / CASE_RUN / "prediction"
        predicted = load_prediction(prediction).predicted if (prediction / PREDICTIONS_JSON).is_file() else []
        if predicted and truly_degraded(case_dir, None):
            logger.warning("%s: the prediction names %s but there is no remediation record (stopped before it "
                           "finished?): left out of the remediation figures; run the case again.", case.name,
                           ", ".join(predicted))
            return []
        return [{"case": case.name, "intervention": case.intervention, "category": c, "remediated": False,
                 "recovered_remediated": float("nan"), "recovered_control": float("nan")}
                for c in sorted(truly_degraded(case_dir, significance))]
    result = load_controlled_remediation(case_dir)
    remediated, control = result.recovered("remediated"), result.recovered("control")
    degraded = result.degraded
    if significance is not None:
        significant = truly_degraded(case_dir, significance)
        degraded = [c for c in degraded if c in significant]
    return [{"case": case.name, "intervention": case.intervention, "category": c, "remediated": True,
             "recovered_remediated": remediated[c], "recovered_control": control[c]} for c in degraded]


def summarize_remediation(rows: pd.DataFrame) -> pd.DataFrame:
    """Per intervention, over its cases with a degraded domain: how many were remediated, the mean ±
    sd over the remediated cases of each case's mean recovered share for both arms, the share of them
    where remediation beat the control, and both arms' means over every case with a case that was not
    remediated counted as 0 for both (nothing was retrained); with several interventions, a last row
    ``all`` over every case of the grid."""
    per_case = rows.groupby(["intervention", "case"], sort=False).agg(
        recovered_remediated=("recovered_remediated", "mean"), recovered_control=("recovered_control", "mean"),
        remediated=("remediated", "all"))
    groups = list(per_case.groupby(level="intervention", sort=False))
    if len(groups) > 1:
        groups.append(("all", per_case))
    out = []
    for intervention, group in groups:
        done = group[group["remediated"]]
        out.append({"intervention": intervention, "cases": len(group), "remediated": len(done),
                    "remediation": _mean_sd(done["recovered_remediated"].dropna()),
                    "control": _mean_sd(done["recovered_control"].dropna()),
                    "remediation ahead": f"{int((done['recovered_remediated'] > done['recovered_control']).sum())}"
                                         f" of {len(done)}",
                    "all cases (not remediated = 0)": f"{group['recovered_remediated'].fillna(0).mean():.2f} vs "
                                                      f"{group['recovered_control'].fillna(0).mean():.2f}"})
    return pd.DataFrame(out)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd of each metric per (intervention, method), over the cases where it is defined,
    with the number of cases and the mean number of predicted and truly degraded categories."""
    out = []
    for (intervention, method), group in rows.groupby(["intervention", "method"], sort=False):
        row = {"intervention": intervention, "method": method, "cases": len(group)}
        for column in METHOD_COLUMNS:
            values = group[column].dropna()
            row[column] = _mean_sd(values)
        row["predicted"] = round(float(group["n_predicted"].mean()), 2)
        row["false_positives"] = round(float((group["n_predicted"] - group["n_hit"]).mean()), 2)
        row["true"] = round(float(group["n_true"].mean()), 2)
        out.append(row)
    return pd.DataFrame(out)


def case_evidence(case: GridCase, case_dir: Path, significance: float | None = None) -> tuple[pd.Series, set[str]]:
    """The finished case's stored prediction as evidence per category (the robust z of its category
    scores, which the outlier rules threshold) and the set of truly degraded categories (as in
    ``score_case``): what ``threshold_ceiling`` reads."""
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.predict import load_prediction

    scores = load_prediction(RunLayout(case_dir / CASE_RUN).prediction).scores.set_index("category")
    if "robust_z" not in scores.columns:
        raise ConfigError(f"{case.name}'s stored prediction has no robust z (its rule is not an outlier rule).")
    evidence = scores["robust_z"].where(scores["score"] > 0).astype(float)  # no score: no evidence
    return evidence, truly_degraded(case_dir, significance)


def truly_degraded(case_dir: Path, significance: float | None = None) -> set[str]:
    """The finished case's truly degraded categories, as ``score_case`` judges them: drop > 0.1 in its
    ground truth and, with ``significance``, a drop also significant at that level."""
    from mneme_plugin.groundtruth.table import SCORES_CSV, read_scores_csv
    from mneme_plugin.sideeffects.evaluate import degraded_categories

    truth = degraded_categories(read_scores_csv(case_dir / SCORES_CSV),
                                EvaluateConfig(drop_threshold=DROP_THRESHOLD, significance=significance))
    return set(truth.loc[truth["degraded"], "category"])


def threshold_ceiling(cases: list[tuple[pd.Series, set[str]]], min_precision: float = 0.8) -> dict[str, float]:
    """The best mean Eq. 4 accuracy that one threshold on a per-category evidence score reaches over
    ``cases`` while their mean precision stays >= ``min_precision``, the threshold picked with
    hindsight from the truth: an upper bound for every rule that thresholds that score, not a rule.

    ``cases``: per case, the evidence of each category (index; NaN: no evidence, never predicted)
    and the truly degraded set. A threshold t predicts the categories with evidence >= t; accuracy
    is averaged over the cases with a degraded category, precision over those with a prediction (as
    ``summarize`` does). Returns ``accuracy``, ``precision`` and ``threshold`` (NaN when no threshold
    keeps the precision)."""
    thresholds = sorted({float(v) for evidence, _ in cases for v in evidence.dropna()}, reverse=True)
    best = {"accuracy": math.nan, "precision": math.nan, "threshold": math.nan}
    for threshold in thresholds:
        accuracies, precisions = [], []
        for evidence, truth in cases:
            predicted = set(evidence.index[evidence >= threshold])
            if truth:
                accuracies.append(len(predicted & truth) / len(truth))
            if predicted:
                precisions.append(len(predicted & truth) / len(predicted))
        if not accuracies or not precisions:
            continue
        accuracy, precision = sum(accuracies) / len(accuracies), sum(precisions) / len(precisions)
        if precision >= min_precision and not accuracy <= best["accuracy"]:
            best = {"accuracy": accuracy, "precision": precision, "threshold": threshold}
    return best


def _mean_sd(values: pd.Series) -> str:
    if values.empty:
        return UNDEFINED
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return f"{values.mean():.2f} ± {sd:.2f} (n={len(values)})" if not math.isnan(sd) else f"{values.mean():.2f} (n=1)"


def behaviour_rows(case: GridCase, case_dir: Path) -> list[dict]:
    """A finished behaviour case in one row: the measured safe-answer drops, MNEME's evaluation on the
    knowledge domains and the intersection analysis (none for a knowledge case)."""
    from mneme_plugin.groundtruth.table import SCORES_CSV, read_scores_csv
    from mneme_plugin.sideeffects import load_evaluation
    from mneme_plugin.sideeffects.harmful import INTERSECTION_JSON, load_harmful_intersection

    if case.intervention not in BEHAVIOUR_INTERVENTIONS or not (case_dir / INTERSECTION_JSON).is_file():
        return []
    truth = read_scores_csv(case_dir / SCORES_CSV)
    knowledge = load_evaluation(case_dir / CASE_RUN / "evaluation" / "knowledge")
    intersection = load_harmful_intersection(case_dir)
    mneme = knowledge.rows["MNEME"]
    return [{"case": case.name, "intervention": case.intervention,
             "safe-answer drop": ", ".join(f"{r.category} {r.before - r.after:+.2f}" for r in truth.itertuples()),
             "knowledge degraded": ",".join(knowledge.true_set),
             "knowledge MNEME": ",".join(knowledge.predicted.get("MNEME", [])),
             "knowledge Acc/F1": f"{metric_text(mneme.accuracy, 2)}/{metric_text(mneme.f1, 2)}",
             "amplified": len(intersection.amplified), "amplified ∩ harmful": intersection.n_intersection,
             "harmful share amplified": round(intersection.amplified_share, 3),
             "harmful share reference": round(intersection.reference_share, 3)}]
