"""The report: one self-contained HTML page (inline SVG charts, no external assets)."""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.attribution.classify import most_specific_first
from mneme_plugin.attribution.config import BASE_LEANING, EDITED_LEANING
from mneme_plugin.files import atomic_write_text
from mneme_plugin.report import svg
from mneme_plugin.sideeffects.evaluate import unmeasured_note
from mneme_plugin.sideeffects.metrics import UNDEFINED, metric_text

logger = logging.getLogger("mneme_plugin")

SECTIONS = ("summary", "overview", "quality", "classes", "delta", "scaling", "latents", "categories", "metrics", "config")

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;font-size:.9em;text-align:left}
th{background:#f5f5f5}.ctx{font-family:monospace;font-size:.85em;margin:2px 0;white-space:pre-wrap}
.tok{border-radius:2px}.muted{color:#777}.grid{display:flex;flex-wrap:wrap;gap:16px}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em}.latent{margin:10px 0;padding:6px 10px;border-left:3px solid #4269d0}
"""


@dataclass
class Context:
    """One top-activating context: its tokens and the latent's activation on each."""

    tokens: list[str]
    activations: list[float]


@dataclass
class ReportData:
    """Everything the report shows; every part is optional (a missing stage shows as not run)."""

    title: str = "MNEME run"
    overview: dict[str, Any] = field(default_factory=dict)
    crosscoder_metrics: dict[str, Any] | None = None
    attribution: pd.DataFrame | None = None
    explanations: dict[int, str] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    contexts: dict[int, list[Context]] = field(default_factory=dict)
    category_scores: pd.DataFrame | None = None  # category, score, predicted
    truth: pd.DataFrame | None = None  # category, before, after, drop, degraded
    metrics_table: pd.DataFrame | None = None  # method, accuracy, precision, recall, f1, ...
    unmeasured: dict[str, list[str]] = field(default_factory=dict)  # predicted where no ground truth is
    outside: pd.DataFrame | None = None  # ground-truth rows outside the prediction's taxonomy, not scored
    config: dict[str, Any] | None = None
    latents_per_class: int = 5
    tables: list["TableView"] = field(default_factory=list)  # runs with several ground truths: one view each
    verdict: str | None = None  # the prediction rule's verdict (``outlier_or_broad``: concentrated, broad, ...)


@dataclass
class TableView:
    """One ground truth of a run: its prediction (in its taxonomy), measured drops and metrics."""

    name: str
    taxonomy: str
    category_scores: pd.DataFrame | None
    truth: pd.DataFrame | None
    metrics_table: pd.DataFrame | None
    outside: pd.DataFrame | None = None
    unmeasured: dict[str, list[str]] = field(default_factory=dict)
    verdict: str | None = None


def _table(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                text = UNDEFINED
            elif isinstance(value, float):
                text = floats.format(value)
            else:
                text = str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _metric_text(value: Any) -> str:
    return metric_text(value) if value is None or isinstance(value, float) else str(value)


def _not_run(stage: str) -> str:
    return f'<p class="muted">Not available: the {html.escape(stage)} stage has not run (or not finished) for this report.</p>'


def _highlight(context: Context) -> str:
    top = max((a for a in context.activations if math.isfinite(a)), default=0.0) or 1.0
    spans = []
    for token, act in zip(context.tokens, context.activations):
        alpha = max(0.0, min(1.0, act / top)) if math.isfinite(act) else 0.0
        title = f' title="{act:.3g}"' if act else ""
        spans.append(f'<span class="tok" style="background:rgba(255,114,92,{alpha:.2f})"{title}>{html.escape(token)}</span>')
    return '<div class="ctx">' + " ".join(spans) + "</div>"


def _slug(name: str) -> str:
    """``name`` as an HTML id part: ASCII letters, digits, ``_`` and ``-`` only. A name that had to change
    gets a short hash of itself appended, so distinct names (``a b``, ``a.b``) keep distinct ids."""
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if slug != name:
        slug += "-" + hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return slug


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{html.escape(anchor, quote=True)}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _names(categories: list[str]) -> str:
    return html.escape(", ".join(categories)) if categories else "none"


def _rate(value: Any) -> str:
    return metric_text(value, digits=2)


def _summary_items(scores: pd.DataFrame | None, truth: pd.DataFrame | None, metrics: pd.DataFrame | None,
                   verdict: str | None, suffix: str = "") -> list[str]:
    """What a reader wants first: what MNEME predicted, what was measured, and how the two compare."""
    items = []
    if scores is not None and "predicted" in scores:
        predicted = scores.loc[scores["predicted"].astype(bool), "category"].astype(str).tolist()
        items.append(f"<li><b>Predicted{html.escape(suffix)}</b>: {_names(predicted)}"
                     + (f" (verdict: {html.escape(verdict)})" if verdict else "") + "</li>")
    if truth is not None and "degraded" in truth:
        degraded = truth.loc[truth["degraded"].fillna(False).astype(bool), "category"].astype(str).tolist()
        items.append(f"<li><b>Degraded, measured{html.escape(suffix)}</b>: {_names(degraded)}</li>")
    if metrics is not None and "method" in metrics and "accuracy" in metrics:
        rows = {str(r["method"]): r for _, r in metrics.iterrows()}
        if "MNEME" in rows:
            mneme = rows.pop("MNEME")
            figures = ", ".join(f"{name} {_rate(mneme.get(column))}" for name, column in
                                (("Acc", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("F1", "f1"))
                                if column in metrics)
            others = "; ".join(f"{html.escape(name)} {_rate(row.get('accuracy'))}" for name, row in rows.items())
            items.append(f"<li><b>MNEME{html.escape(suffix)}</b>: {figures}"
                         + (f" (Acc of the baselines: {others})" if others else "") + "</li>")
    return items


def _summary_section(data: ReportData) -> str:
    items: list[str] = []
    if data.tables:
        for view in data.tables:
            items += _summary_items(view.category_scores, view.truth, view.metrics_table, view.verdict,
                                    f" ({view.name})")
    else:
        items = _summary_items(data.category_scores, data.truth, data.metrics_table, data.verdict)
    return _section("summary", "Summary", f"<ul>{''.join(items)}</ul>" if items else _not_run("predict"))


def _contents(sections: list[str]) -> str:
    """Links to the sections of the page (their ids and titles as rendered)."""
    found = [re.search(r'<section id="([^"]+)"><h2>(.*?)</h2>', part, re.DOTALL) for part in sections]
    links = " · ".join(f'<a href="#{m.group(1)}">{m.group(2)}</a>' for m in found if m)
    return f'<p class="muted">Contents: {links}</p>'


def _evaluation_sections(scores: pd.DataFrame | None, truth: pd.DataFrame | None, metrics: pd.DataFrame | None,
                         suffix: str, anchor: str, outside: pd.DataFrame | None,
                         unmeasured: dict[str, list[str]]) -> list[str]:
    """Predicted vs. measured per category, and the metrics table, for one ground truth."""
    parts = []
    if scores is not None and len(scores):
        merged = scores.copy()
        if truth is not None:
            kept = [c for c in ("category", "before", "after", "drop", "degraded") if c in truth]
            merged = merged.merge(truth[kept], on="category", how="left")
        merged = merged.sort_values("score", ascending=False, kind="stable")
        top = max(float(merged["score"].max()), 1e-12)
        series = {"predicted score (scaled to 1)": (merged["score"] / top).tolist()}
        if "drop" in merged:
            drop = merged["drop"].fillna(0.0)
            series["observed drop (scaled to 1)"] = (drop / max(float(drop.abs().max()), 1e-12)).tolist()
        chart = svg.bars(merged["category"].astype(str).tolist(), series, "Predicted vs. observed per category", "")
        columns = [c for c in ("category", "score", "predicted", "before", "after", "drop", "degraded") if c in merged]
        parts.append(_section("categories" + anchor, "Predicted and observed side effects" + suffix, chart + _table(merged[columns])))
    else:
        parts.append(_section("categories" + anchor, "Predicted and observed side effects" + suffix, _not_run("predict")))

    if metrics is not None and len(metrics):
        parts.append(_section("metrics" + anchor, "Metrics (paper Table 1)" + suffix, _table(metrics)
                              + '<p class="muted">Acc is Eq. 4: |true ∩ predicted| / |true|.</p>'
                              + (f'<p class="muted">Not scored (outside the taxonomy):</p>{_table(outside)}'
                                 if outside is not None and len(outside) else "")
                              + "".join(f'<p class="muted">{html.escape(unmeasured_note(name, categories))}</p>'
                                        for name, categories in unmeasured.items())))
    else:
        parts.append(_section("metrics" + anchor, "Metrics (paper Table 1)" + suffix, _not_run("evaluate")))

    return parts


def render_report(data: ReportData) -> str:
    """The report page as a string."""
    parts = [_summary_section(data)]
    overview = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in data.overview.items())
    parts.append(_section("overview", "Overview", f"<table>{overview}</table>" if overview else _not_run("harvest")))

    if data.crosscoder_metrics:
        quality = pd.DataFrame({"metric": list(data.crosscoder_metrics),
                                "value": [_metric_text(v) for v in data.crosscoder_metrics.values()]})
        parts.append(_section("quality", "Crosscoder quality", _table(quality)
                              + '<p class="muted">Paper targets: under 15% dead latents, over 95% explained variance.</p>'))
    else:
        parts.append(_section("quality", "Crosscoder quality", _not_run("train")))

    attr = data.attribution
    if attr is not None and len(attr):
        counts = attr["latent_class"].value_counts()
        order = [c for c in ("base_only", "suppressed", "shared", "amplified", "edited_only", "dead") if c in counts]
        chart = svg.bars(order, {"latents": [float(counts[c]) for c in order]}, "Latents per class", "latents")
        parts.append(_section("classes", "Latents per class", chart + _table(
            pd.DataFrame({"class": order, "latents": [int(counts[c]) for c in order]}))))
        alive = attr[attr["latent_class"] != "dead"]
        parts.append(_section("delta", "Relative decoder norm", svg.histogram(
            alive["delta"].tolist(), 40, "Relative decoder norm Delta (1 = base only, 0 = edited only)", "Delta",
            lo=0.0, hi=1.0, log_y=True)))
        parts.append(_section("scaling", "Latent scaling", svg.scatter(
            alive["nu_r"].tolist(), alive["nu_e"].tolist(), alive["latent_class"].tolist(),
            "Latent-scaling ratios", "nu_r = beta_r base / edited", "nu_e = beta_e base / edited")))
        blocks = []
        for cls in BASE_LEANING + EDITED_LEANING:
            chosen = most_specific_first(attr, cls).head(data.latents_per_class)
            if chosen.empty:
                continue
            blocks.append(f"<h3>{html.escape(cls)}</h3>")
            for row in chosen.itertuples(index=False):
                latent = int(row.latent)
                desc = data.explanations.get(latent, "(no explanation yet)")
                label = data.labels.get(latent)
                contexts = "".join(_highlight(c) for c in data.contexts.get(latent, [])[:4])
                blocks.append(
                    f'<div class="latent"><b>latent {latent}</b> score {row.score:.3f}, Delta {row.delta:.3f}'
                    + (f", category <b>{html.escape(label)}</b>" if label else "")
                    + f"<br>{html.escape(desc)}{contexts}</div>"
                )
        parts.append(_section("latents", "Top latents per class", "".join(blocks) or "<p>No latent outside the shared class.</p>"))
    else:
        for anchor, title in (("classes", "Latents per class"), ("delta", "Relative decoder norm"),
                              ("scaling", "Latent scaling"), ("latents", "Top latents per class")):
            parts.append(_section(anchor, title, _not_run("attribute")))

    if data.tables:
        for view in data.tables:
            suffix = f" — {view.name} (taxonomy {view.taxonomy})"
            parts += _evaluation_sections(view.category_scores, view.truth, view.metrics_table, suffix,
                                          f"-{_slug(view.name)}", view.outside, view.unmeasured)
    else:
        parts += _evaluation_sections(data.category_scores, data.truth, data.metrics_table, "", "", data.outside,
                                      data.unmeasured)

    config_text = json.dumps(data.config, indent=2, default=str) if data.config else ""
    parts.append(_section("config", "Run configuration", f"<pre>{html.escape(config_text)}</pre>" if config_text else _not_run("run")))
    body = "\n".join([f"<h1>{html.escape(data.title)}</h1>", _contents(parts), *parts])
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(data.title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(data: ReportData, path: str | os.PathLike[str]) -> Path:
    path = atomic_write_text(path, render_report(data))
    logger.info("Report written to %s.", path)
    return path
