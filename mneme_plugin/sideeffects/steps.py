"""The predict and evaluate steps of a run directory: one function each, called by ``mneme run``
and by the ``mneme predict`` / ``mneme evaluate`` commands alike.

They read the earlier stages' outputs only through those stages' loaders (attribution, mapping,
ground truth) and write through ``save_prediction`` / ``save_evaluation``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mneme_plugin.files import json_digest
from mneme_plugin.groundtruth.table import GroundTruthConfig, load_ground_truth
from mneme_plugin.interpret.config import MapConfig
from mneme_plugin.layout import RunLayout
from mneme_plugin.sideeffects.config import CONTROL_RULES, EvaluateConfig, PredictConfig
from mneme_plugin.sideeffects.evaluate import Evaluation, evaluate, save_evaluation
from mneme_plugin.sideeffects.predict import PREDICTIONS_JSON, Prediction, load_prediction, predict, save_prediction

logger = logging.getLogger("mneme_plugin")

if TYPE_CHECKING:
    import pandas as pd


def predict_run(run_dir: str | os.PathLike[str], config: PredictConfig, taxonomy: str,
                out_dir: str | os.PathLike[str] | None = None,
                before_write: Callable[[], None] | None = None) -> Prediction:
    """Predict the affected categories of ``taxonomy`` from the run's attribution and mapping; save
    them to ``out_dir`` (default the run's ``prediction/``). ``before_write`` runs once the prediction is
    made, just before its files replace the old ones (a refused or failed prediction writes nothing and
    does not run it: the stage commands unmark the run's stages there)."""
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret.contexts import load_reference_latents
    from mneme_plugin.interpret.mapping import category_links, latent_descriptions, load_mapping
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    layout = RunLayout(Path(run_dir))
    tax = load_taxonomy(taxonomy)
    mapping = load_mapping(layout.mapping)
    mapped = sorted(set(mapping["taxonomy"].astype(str))) if "taxonomy" in mapping else []
    if tax.name not in mapped:
        from mneme_plugin.errors import ConfigError

        raise ConfigError(f"The run's latents were not mapped to taxonomy {tax.name!r} (mapped: {mapped}); predict "
                          f"over one of those, or map to it first (`mneme map --taxonomy {taxonomy}`, or add it to "
                          "map.taxonomies and run again).")
    reference = None
    if config.reads_reference():
        from mneme_plugin.errors import CheckpointError

        try:
            reference = load_reference_latents(layout.contexts)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err} The {config.rule} rule{' with a control run' if config.rule in CONTROL_RULES else ''} reads "
                "from it the uniform sample of live latents collect draws (collect.reference_latents)"
                + (" for its concentration test." if config.rule in CONTROL_RULES else ", its null.")) from err
    control = load_control_attribution(config.control_run) if config.rule in CONTROL_RULES else None
    prediction = predict(load_attribution(layout.attribution).table, category_links(mapping, tax.name), tax.ids(),
                         config, latent_descriptions(mapping), reference=reference, control=control)
    if before_write is not None:
        before_write()
    prediction.taxonomy = tax.name  # what evaluate's naive baseline maps the edit's description onto
    save_prediction(prediction, out_dir if out_dir is not None else layout.prediction)
    return prediction


def mapped_taxonomies(run_dir: str | os.PathLike[str]) -> list[str]:
    """The taxonomies the run's mapping holds, in the mapping's order (that of map.taxonomies when it ran);
    empty without a mapping."""
    from mneme_plugin.interpret.mapping import load_mapping

    layout = RunLayout(Path(run_dir))
    if not layout.mapping.is_dir():
        return []
    mapping = load_mapping(layout.mapping)
    return list(dict.fromkeys(mapping["taxonomy"].astype(str))) if "taxonomy" in mapping else []


def prediction_target(run_dir: str | os.PathLike[str], taxonomy: str | None, run_taxonomies: list[str] | None,
                      map_taxonomies: list[str] | None = None) -> tuple[str, Path]:
    """The taxonomy ``mneme predict`` predicts over and the folder its prediction goes to.

    ``run_taxonomies``: those the run predicts for (its config's, ``RunConfig.taxonomies``; None for a
    folder without config.yaml, the stage commands' outputs). Each of them goes where the run's stages
    keep it (``prediction_folder``); another mapped taxonomy goes to ``prediction/<taxonomy>/``, never
    over the run's own prediction. A folder without config.yaml predicts over the first of
    ``map_taxonomies`` (the map section given), else the first its mapping holds; that one goes to
    ``prediction/``, where evaluate and the report read it. ``taxonomy``: the one asked for, if any."""
    if run_taxonomies is not None:
        taxonomies = run_taxonomies
    elif map_taxonomies:
        taxonomies = map_taxonomies[:1]
    else:
        taxonomies = mapped_taxonomies(run_dir)[:1] or MapConfig().taxonomies[:1]
    taxonomy = taxonomy or taxonomies[0]
    own = taxonomy in taxonomies
    if not own and run_taxonomies is None:
        from mneme_plugin.interpret.taxonomy import load_taxonomy

        # --taxonomy FILE.yaml of the taxonomy the mapping names: the folder's own all the same.
        own = load_taxonomy(taxonomy).name == taxonomies[0]
    out = prediction_folder(run_dir, taxonomy, taxonomies) if own else RunLayout(Path(run_dir)).prediction / taxonomy
    return taxonomy, out


def pool_runs(run_dirs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str], taxonomy: str | None = None,
              min_votes: int | None = None) -> Prediction:
    """Pool the predictions of finished runs on the same model pair (crosscoders of different seeds)
    by vote (``sideeffects.pool``); saved to ``out_dir``'s ``prediction/``, where ``mneme evaluate
    --run-dir out_dir`` reads it. ``taxonomy``: which prediction of runs that predict several."""
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.pipeline.config import load_run_config
    from mneme_plugin.sideeffects.pool import pool_predictions

    resolved = [Path(r).resolve() for r in run_dirs]
    repeated = sorted({str(r) for r in resolved if resolved.count(r) > 1})
    if repeated:
        # One run counted twice would outvote the others with the same crosscoder.
        raise ConfigError(f"Run(s) given more than once: {repeated}. Pool runs of different crosscoders "
                          "(e.g. other training.seed values), each once.")
    out = RunLayout(Path(out_dir))
    if out.root.resolve() in resolved or out.config.is_file() or out.stages.is_dir():
        # The vote would replace that run's own prediction, and every later pool would count the vote as its own.
        raise ConfigError(f"The pooled prediction's folder {out_dir} is "
                          + ("one of the pooled runs" if out.root.resolve() in resolved else "a `mneme run` directory")
                          + ": its own prediction would be replaced. Give a new folder (mneme pool ... --out DIR).")
    predictions, models, crosscoders = [], {}, {}
    for run_dir in run_dirs:
        config = load_run_config(run_dir)
        models[str(run_dir)] = (config.models.base, config.models.edited)
        # Same crosscoder settings and training seed: the same crosscoder, which would vote twice.
        trained = json_digest([config.models.result_dict(), config.corpus.result_dict(), config.harvest.result_dict(),
                               config.crosscoder.result_dict(), config.training.result_dict()])
        if trained in crosscoders:
            raise ConfigError(f"Runs {crosscoders[trained]} and {run_dir} train the same crosscoder (same settings "
                              f"and training.seed {config.training.seed}): pool runs whose crosscoders differ.")
        crosscoders[trained] = str(run_dir)
        taxonomies = list(config.map.taxonomies)
        if taxonomy is not None and taxonomy not in taxonomies:
            raise ConfigError(f"Run {run_dir} predicts over {taxonomies}, not {taxonomy!r}.")
        predictions.append(load_prediction(prediction_folder(run_dir, taxonomy or taxonomies[0], taxonomies)))
    if len(set(models.values())) > 1:
        listing = "; ".join(f"{run}: {base} -> {edited}" for run, (base, edited) in models.items())
        raise ConfigError(f"The runs compare different models ({listing}): pool runs of one edit only.")
    rules = {str(run): prediction.config.rule for run, prediction in zip(run_dirs, predictions)}
    if len(set(rules.values())) > 1:
        logger.warning("The pooled predictions were made with different rules (%s): the vote mixes them.",
                       "; ".join(f"{run}: {rule}" for run, rule in rules.items()))
    pooled = pool_predictions(predictions, min_votes, names=[str(r) for r in resolved])
    save_prediction(pooled, out.prediction)
    # An earlier pool's evaluation and report in the folder describe the prediction just replaced.
    for stale in (out.evaluation, out.report):
        if stale.exists():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            logger.info("Removed %s: it described the previous pooled prediction (mneme evaluate --run-dir %s).",
                        stale, out_dir)
    return pooled


def settings_run(run_dir: str | os.PathLike[str]) -> Path | None:
    """The run whose ``config.yaml`` holds ``run_dir``'s settings (taxonomies, evaluation, the edit's
    description): ``run_dir`` itself, or for a folder written by ``mneme pool``, the first pooled run;
    None for neither."""
    layout = RunLayout(Path(run_dir))
    if layout.config.is_file():
        return layout.root
    if (layout.prediction / PREDICTIONS_JSON).is_file():
        runs = load_prediction(layout.prediction).tests.get("runs") or []
        if runs and RunLayout(Path(runs[0])).config.is_file():
            return Path(runs[0])
    return None


def load_control_attribution(control_run: str | os.PathLike[str] | None) -> "pd.DataFrame | None":
    """The attribution table of the control run (``predict.control_run``), or None without one."""
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.errors import ConfigError

    if control_run is None:
        return None
    folder = RunLayout(Path(control_run)).attribution
    if not folder.is_dir():
        raise ConfigError(
            f"predict.control_run {control_run} has no attribution ({folder} is missing): run the control "
            "first (`mneme run` with models.edited = a benignly perturbed copy of the base, at least up to "
            "`attribute`), or leave control_run out.")
    return load_attribution(folder).table


def naive_prediction(intervention: str, map_config: MapConfig, n: int, taxonomy: str | None = None) -> list[str]:
    """The naive baseline: the ``n`` categories the run's mapper puts closest to a plain-text
    description of the intervention (in ``taxonomy``, default the first of ``map_config``)."""
    import numpy as np

    from mneme_plugin.interpret.mapping import EmbeddingMapper, LexicalMapper
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(taxonomy or map_config.taxonomies[0])
    if map_config.method == "embedding":
        mapper: LexicalMapper | EmbeddingMapper = EmbeddingMapper(taxonomy, str(map_config.embedding_model))
    else:
        mapper = LexicalMapper(taxonomy)
    scores = mapper.scores(intervention)
    order = np.argsort(-scores, kind="stable")[:n]
    return [taxonomy.entries[i].id for i in order if scores[i] > 0]


def evaluate_run(run_dir: str | os.PathLike[str], config: EvaluateConfig, ground_truth: GroundTruthConfig,
                 map_config: MapConfig, intervention: str = "",
                 before_write: Callable[[], None] | None = None) -> Evaluation:
    """Score the run's prediction against the ground truth, with the baselines; save the evaluation.

    ``intervention``: a plain-text description of the edit for the naive baseline (none without it).
    ``before_write``: run once the evaluation is made, just before its files replace the old ones (as
    ``predict_run``'s).

    Ground-truth rows outside the prediction's categories (e.g. WMDP beside the MMLU subjects, or a
    misspelt ``Law ``) are not scored: a warning names them, and the evaluation keeps them as ``outside``
    (as ``evaluate_tables`` does). The naive baseline maps ``intervention`` onto the prediction's taxonomy.
    """
    layout = RunLayout(Path(run_dir))
    truth = load_ground_truth(ground_truth)
    prediction = load_prediction(layout.prediction)
    categories = prediction.scores["category"].astype(str).tolist()
    inside = _split_truth(truth, categories, prediction.taxonomy)
    taxonomy = _prediction_taxonomy(prediction, map_config) if intervention else None
    naive = (naive_prediction(intervention, map_config, max(1, len(prediction.predicted)), taxonomy)
             if taxonomy is not None else None)
    evaluation = evaluate(prediction.predicted, truth[inside].reset_index(drop=True), categories,
                          naive_predicted=naive, config=config)
    evaluation.taxonomy = prediction.taxonomy
    evaluation.outside = truth[~inside].to_dict(orient="records")
    if before_write is not None:
        before_write()
    save_evaluation(evaluation, layout.evaluation)
    return evaluation


def _folded(name: str) -> str:
    """A category name as a near miss reads it: case, surrounding spaces, spaces and hyphens for underscores."""
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _split_truth(truth: "pd.DataFrame", categories: list[str], taxonomy: str | None,
                 table: str | None = None) -> "pd.Series":
    """Which ground-truth rows name one of the prediction's categories (a boolean mask). None of them: a
    ConfigError (the ground truth scores nothing); some not: a warning naming them, with the near misses
    (case, spaces, underscores) they probably meant. ``table``: the named ground-truth table they come
    from (``ground_truth.tables``), whose own ``categories`` mapping renames them."""
    from mneme_plugin.errors import ConfigError

    measured = [str(c) for c in truth["category"]]
    inside = truth["category"].astype(str).isin(set(categories))
    key = {_folded(c): c for c in categories}
    outside = [m for m, kept in zip(measured, inside) if not kept]
    near = {m: key[_folded(m)] for m in outside if _folded(m) in key}
    hint = f" Did you mean {', '.join(f'{v!r} for {k!r}' for k, v in list(near.items())[:5])}?" if near else ""
    source = f"ground-truth table {table!r}" if table else "the ground truth"
    where = f"taxonomy {taxonomy!r}" if taxonomy else "the prediction's taxonomy"
    if not inside.any():
        fix = ("Rename them with the table's `categories` mapping, or give the table the taxonomy they belong to "
               "(its `taxonomy`)." if table else "Rename them, or predict over the taxonomy they belong to.")
        raise ConfigError(f"The categories of {source} ({measured[:5]}{'...' if len(measured) > 5 else ''}) share "
                          f"none with the prediction's taxonomy ({where}: {categories[:5]}...).{hint} {fix}")
    if outside:
        logger.warning("%s has categories outside %s, not scored (kept in the evaluation as outside): %s.%s",
                       source[0].upper() + source[1:], where, ", ".join(map(repr, outside[:10])) + (" ..." if len(outside) > 10 else ""),
                       hint)
    return inside


def _prediction_taxonomy(prediction: Prediction, map_config: MapConfig) -> str | None:
    """The taxonomy (as ``load_taxonomy`` reads it) the prediction was made over: the one it records (a
    file of map.taxonomies by that name, else the built-in); for a file written before predictions
    recorded it, the first of map.taxonomies, then of the built-ins, that has all its categories. None,
    with a warning, when none is found (the naive baseline is then left out)."""
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.interpret.taxonomy import builtin_taxonomies, load_taxonomy

    categories = set(prediction.scores["category"].astype(str))
    candidates = list(dict.fromkeys([*map_config.taxonomies, *builtin_taxonomies()]))
    for spec in candidates:
        try:
            taxonomy = load_taxonomy(spec)
        except ConfigError:
            continue
        if taxonomy.name == prediction.taxonomy if prediction.taxonomy else categories <= set(taxonomy.ids()):
            return spec
    logger.warning("The prediction's taxonomy (%s) is not among map.taxonomies or the built-ins: the naive baseline "
                   "is left out (add its file to map.taxonomies to have it).",
                   repr(prediction.taxonomy) if prediction.taxonomy else "not recorded, and none has all its categories")
    return None


def prediction_folder(run_dir: str | os.PathLike[str], taxonomy: str, taxonomies: list[str]) -> Path:
    """Where the predict stage saved ``taxonomy``'s prediction: ``prediction/`` when the run has one
    taxonomy, ``prediction/<taxonomy>/`` when it has several."""
    layout = RunLayout(Path(run_dir))
    return layout.prediction if len(taxonomies) == 1 else layout.prediction / taxonomy


def evaluate_tables(run_dir: str | os.PathLike[str], config: EvaluateConfig, ground_truth: GroundTruthConfig,
                    map_config: MapConfig, taxonomies: list[str], intervention: str = "") -> dict[str, Evaluation]:
    """One evaluation per ground-truth table of the run (``ground_truth.tables``), each against the
    prediction for the table's taxonomy; saved to ``evaluation/<table>/``. Table rows outside the
    taxonomy (e.g. WMDP beside the MMLU subjects) are kept in the evaluation as ``outside``, not scored,
    with a warning (as ``evaluate_run``'s); a table with none inside is refused."""
    from mneme_plugin.groundtruth.sources import load_tables

    layout = RunLayout(Path(run_dir))
    out = {}
    for name, (taxonomy, truth) in load_tables(ground_truth, layout.ground_truth, taxonomies[0]).items():
        prediction = load_prediction(prediction_folder(run_dir, taxonomy, taxonomies))
        categories = prediction.scores["category"].astype(str).tolist()
        inside = _split_truth(truth, categories, taxonomy, table=name)
        naive = (naive_prediction(intervention, map_config, max(1, len(prediction.predicted)), taxonomy)
                 if intervention else None)
        evaluation = evaluate(prediction.predicted, truth[inside].reset_index(drop=True), categories,
                              naive_predicted=naive, config=config)
        evaluation.taxonomy = taxonomy
        evaluation.outside = truth[~inside].to_dict(orient="records")
        save_evaluation(evaluation, layout.evaluation / name)
        out[name] = evaluation
    return out
