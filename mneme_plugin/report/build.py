"""Gather a run directory's outputs into ``ReportData`` and write ``report.html``.

Each stage's outputs are read through that stage's own loader; a stage that has not run is left
out of the report (shown as not available), one whose files cannot be read is left out with a
warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mneme_plugin.errors import MnemeError
from mneme_plugin.layout import RunLayout
from mneme_plugin.report.html import Context, ReportData, TableView, write_report

logger = logging.getLogger("mneme_plugin")

T = TypeVar("T")


def _optional(what: str, folder: Path, loader: Callable[[], T]) -> T | None:
    """``loader()``, or None when the stage has not run (its folder is absent) or cannot be read."""
    if not folder.exists():
        return None
    try:
        return loader()
    except MnemeError as err:
        logger.warning("The %s is left out of the report: %s", what, err)
        return None


def _contexts(layout: RunLayout, latents: list[int], per_latent: int = 4) -> dict[int, list[Context]]:
    from mneme_plugin.interpret.contexts import load_contexts
    from mneme_plugin.interpret.explain import load_tokenizer

    contexts = load_contexts(layout.contexts)
    tokenizer = load_tokenizer(layout.contexts)
    out: dict[int, list[Context]] = {}
    for latent in latents:
        if latent not in contexts.latents:
            continue
        tokens, acts, _ = contexts.top_examples(latent)
        out[latent] = [
            Context(tokenizer.convert_ids_to_tokens(row.tolist()), act.tolist())
            for row, act in zip(tokens[:per_latent], acts[:per_latent])
        ]
    return out


def gather(run_dir: str | os.PathLike[str]) -> ReportData:
    """Everything available in ``run_dir``; stages that did not run are left empty."""
    from mneme_plugin.activations.manifest import read_manifest
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.crosscoder.training import load_training_metrics
    from mneme_plugin.interpret.explain import has_explanation, load_explanations
    from mneme_plugin.interpret.mapping import latent_descriptions, load_mapping
    from mneme_plugin.pipeline.config import load_run_config
    import pandas as pd

    from mneme_plugin.sideeffects import load_evaluations, load_prediction, prediction_folder
    from mneme_plugin.sideeffects.evaluate import evaluated_other_prediction
    from mneme_plugin.sideeffects.predict import PREDICTIONS_JSON

    layout = RunLayout(Path(run_dir))
    layout.check_is_run()
    config = _optional("run config", layout.config, lambda: load_run_config(layout.root))
    title = (config.models.intervention if config is not None and config.models.intervention
             else layout.root.resolve().name)
    data = ReportData(title=f"MNEME run: {title}")
    manifest = _optional("activation store", layout.activations, lambda: read_manifest(layout.activations))
    if manifest is not None:
        data.overview = {"base model": manifest.get("base_model"), "edited model": manifest.get("edited_model"),
                         "hook": manifest.get("hook_name"), "corpus": manifest.get("corpus"),
                         "paired tokens": manifest.get("n_tokens")}
    data.crosscoder_metrics = _optional("crosscoder quality", layout.crosscoder_run,
                                        lambda: load_training_metrics(layout.crosscoder_run))
    attribution = _optional("attribution", layout.attribution, lambda: load_attribution(layout.attribution))
    data.attribution = attribution.table if attribution is not None else None
    mapping = _optional("mapping", layout.mapping, lambda: load_mapping(layout.mapping))
    if mapping is not None:
        first = mapping.drop_duplicates("latent")
        data.explanations = latent_descriptions(mapping)
        data.labels = {int(r.latent): f"{r.label} -> {r.category if isinstance(r.category, str) else 'no category'}"
                       for r in first.itertuples(index=False)}
    else:
        table = _optional("explanations", layout.explanations, lambda: load_explanations(layout.explanations))
        if table is not None:
            table = table[has_explanation(table)]  # an unparsed answer reads "(no explanation yet)"
            data.explanations = {int(r.latent): str(r.explanation) for r in table.itertuples(index=False)}
    if data.attribution is not None and layout.contexts.exists():
        shown = _shown_latents(data.attribution, data.latents_per_class)
        try:
            data.contexts = _contexts(layout, shown)
        except Exception as err:  # the report must not fail because contexts cannot be decoded
            logger.warning("Contexts left out of the report: %s", err)
    prediction = (_optional("prediction", layout.prediction, lambda: load_prediction(layout.prediction))
                  if (layout.prediction / PREDICTIONS_JSON).is_file() else None)
    if prediction is not None:
        data.category_scores = prediction.scores
        data.verdict = prediction.tests.get("verdict")
    evaluations = _optional("evaluation", layout.evaluation, lambda: load_evaluations(layout.evaluation)) or {}
    if "" in evaluations and prediction is not None and evaluated_other_prediction(evaluations[""], prediction.predicted):
        logger.warning("The evaluation is left out of the report: it scored an earlier prediction (%s), not the one "
                       "in %s (%s); score this one with `mneme evaluate --run-dir %s`.",
                       ", ".join(evaluations[""].predicted.get("MNEME", [])) or "none", layout.prediction,
                       ", ".join(prediction.predicted) or "none", layout.root)
        del evaluations[""]
    if set(evaluations) == {""}:
        data.truth = evaluations[""].truth
        data.metrics_table = evaluations[""].table()
        data.unmeasured = evaluations[""].unmeasured
        data.outside = pd.DataFrame(evaluations[""].outside) if evaluations[""].outside else None
    for name, evaluation in evaluations.items():
        if not name:
            continue
        taxonomy = evaluation.taxonomy or "?"
        taxonomies = config.taxonomies() if config is not None else [taxonomy]
        folder = prediction_folder(layout.root, taxonomy, taxonomies)
        view_prediction = _optional(f"prediction for {taxonomy}", folder, lambda f=folder: load_prediction(f))
        if view_prediction is not None and evaluated_other_prediction(evaluation, view_prediction.predicted):
            logger.warning("The evaluation of %s is left out of the report: it scored an earlier prediction than "
                           "the one in %s; score this one with `mneme run CONFIG --only evaluate`.", name, folder)
            continue
        data.tables.append(TableView(name, taxonomy,
                                     view_prediction.scores if view_prediction is not None else None,
                                     evaluation.truth, evaluation.table(),
                                     pd.DataFrame(evaluation.outside) if evaluation.outside else None,
                                     evaluation.unmeasured,
                                     view_prediction.tests.get("verdict") if view_prediction is not None else None))
    if config is not None:
        from mneme_plugin.interpret.clients import redacted_keys

        data.config = redacted_keys(config.to_dict())  # the report is made to be shared
    return data


def _shown_latents(attribution: Any, per_class: int) -> list[int]:
    from mneme_plugin.attribution.classify import most_specific_first
    from mneme_plugin.attribution.config import BASE_LEANING, EDITED_LEANING

    shown: list[int] = []
    for cls in BASE_LEANING + EDITED_LEANING:
        shown += most_specific_first(attribution, cls)["latent"].head(per_class).astype(int).tolist()
    return shown


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``run_dir/report.html``)."""
    layout = RunLayout(Path(run_dir))
    return write_report(gather(run_dir), out or layout.report)
