"""Gather a run directory's outputs into ``ReportData`` and write ``report.html``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mneme_plugin.layout import RunLayout
from mneme_plugin.report.html import Context, ReportData, write_report

logger = logging.getLogger("mneme_plugin")


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
    layout = RunLayout(Path(run_dir))
    name = layout.root.resolve().name
    if name == "run":  # e.g. runs/demo/rmu/run: the case's name is the parent's
        name = layout.root.resolve().parent.name
    data = ReportData(title=f"MNEME run: {name}")
    if (layout.activations / "manifest.json").is_file():
        m = json.loads((layout.activations / "manifest.json").read_text())
        data.overview = {"base model": m.get("base_model"), "edited model": m.get("edited_model"),
                         "hook": m.get("hook_name"), "corpus": m.get("corpus"), "paired tokens": m.get("n_tokens")}
    if (layout.crosscoder_run / "metrics.json").is_file():
        data.crosscoder_metrics = json.loads((layout.crosscoder_run / "metrics.json").read_text())
    if (layout.attribution / "attribution.parquet").is_file():
        data.attribution = pd.read_parquet(layout.attribution / "attribution.parquet")
    if (layout.mapping / "categories.parquet").is_file():
        mapping = pd.read_parquet(layout.mapping / "categories.parquet")
        first = mapping.drop_duplicates("latent")
        data.explanations = {int(r.latent): str(r.description) for r in first.itertuples(index=False)}
        data.labels = {int(r.latent): f"{r.label} -> {r.category if isinstance(r.category, str) else 'no category'}"
                       for r in first.itertuples(index=False)}
    elif (layout.explanations / "explanations.parquet").is_file():
        table = pd.read_parquet(layout.explanations / "explanations.parquet")
        data.explanations = {int(r.latent): str(r.explanation) for r in table.itertuples(index=False)}
    if data.attribution is not None and (layout.contexts / "contexts.json").is_file():
        shown = _shown_latents(data.attribution, data.latents_per_class)
        try:
            data.contexts = _contexts(layout, shown)
        except Exception as err:  # the report must not fail because contexts cannot be decoded
            logger.warning("Contexts left out of the report: %s", err)
    if (layout.prediction / "predictions.json").is_file():
        data.category_scores = pd.DataFrame(json.loads((layout.prediction / "predictions.json").read_text())["scores"])
    if (layout.evaluation / "evaluation.json").is_file():
        evaluation = json.loads((layout.evaluation / "evaluation.json").read_text())
        data.truth = pd.DataFrame(evaluation["truth"])
        data.metrics_table = pd.DataFrame([{"method": k, **v} for k, v in evaluation["metrics"].items()])
    if layout.config.is_file():
        data.config = yaml.safe_load(layout.config.read_text())
    return data


def _shown_latents(attribution: pd.DataFrame, per_class: int) -> list[int]:
    from mneme_plugin.attribution.classify import BASE_LEANING, EDITED_LEANING, most_specific_first

    shown: list[int] = []
    for cls in BASE_LEANING + EDITED_LEANING:
        shown += most_specific_first(attribution, cls)["latent"].head(per_class).astype(int).tolist()
    return shown


def build_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``run_dir/report.html``)."""
    layout = RunLayout(Path(run_dir))
    return write_report(gather(run_dir), out or layout.report)


def report_sections_present(data: ReportData) -> dict[str, Any]:
    """Which parts a report will show (for ``mneme report`` output)."""
    return {
        "crosscoder quality": data.crosscoder_metrics is not None,
        "attribution": data.attribution is not None,
        "explanations": bool(data.explanations),
        "contexts": bool(data.contexts),
        "prediction": data.category_scores is not None,
        "evaluation": data.metrics_table is not None,
    }
