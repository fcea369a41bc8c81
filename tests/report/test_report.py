"""The report renders every section, and opens in headless Chromium without console errors."""

import math
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from mneme_plugin.report import SECTIONS, Context, ReportData, render_report, write_report
from mneme_plugin.report.html import TableView


def _data() -> ReportData:
    rng = np.random.default_rng(0)
    n = 200
    classes = rng.choice(["base_only", "suppressed", "shared", "amplified", "edited_only", "dead"], size=n)
    attribution = pd.DataFrame({
        "latent": np.arange(n), "latent_class": classes, "delta": rng.uniform(0, 1, n),
        "nu_r": rng.normal(0.5, 0.5, n), "nu_e": rng.normal(0.5, 0.5, n), "score": rng.uniform(-1, 1, n),
    })
    base_only = int(attribution.loc[attribution["latent_class"] == "base_only"].sort_values("score").iloc[-1]["latent"])
    return ReportData(
        title="Test run <script>",
        overview={"base model": "tiny-base", "edited model": "tiny-rmu", "hook": "blocks.1.hook_resid_post"},
        crosscoder_metrics={"explained_variance_base": 0.97, "explained_variance_edited": 0.96, "l0": 16.2,
                            "dead_fraction": 0.03},
        attribution=attribution,
        explanations={base_only: "tokens about genes & <enzymes>"},
        labels={base_only: "biology"},
        contexts={base_only: [Context(["the", "gene", "encodes", "rna"], [0.0, 2.5, 0.5, math.nan])]},
        category_scores=pd.DataFrame({"category": ["biology", "law", "cooking"], "score": [1.2, 0.1, 0.0],
                                      "predicted": [True, False, False]}),
        truth=pd.DataFrame({"category": ["biology", "law", "cooking"], "before": [0.9, 0.8, 0.7],
                            "after": [0.3, 0.79, 0.7], "drop": [0.6, 0.01, 0.0], "degraded": [True, False, False]}),
        metrics_table=pd.DataFrame({"method": ["MNEME", "random"], "accuracy": [1.0, 0.5], "f1": [1.0, 0.4]}),
        unmeasured={"MNEME": ["<chemistry>"]},
        config={"harvest": {"layer": 1}},
    ), base_only


def test_every_section_is_rendered_and_text_is_escaped():
    data, base_only = _data()
    page = render_report(data)
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert "Not available" not in page
    assert "<script>" not in page and "&lt;enzymes&gt;" in page
    assert "MNEME also predicted &lt;chemistry&gt;: no ground truth there, not scored." in page
    assert f"latent {base_only}</b>" in page and page.count("<svg") >= 4
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_summary_states_prediction_truth_and_metrics_first():
    data, _ = _data()
    data.verdict = "concentrated"
    data.category_scores = pd.DataFrame({"category": ["biology", "law", "cooking"], "score": [1.2, 0.9, 0.0],
                                         "predicted": [True, True, False]})
    data.metrics_table = pd.DataFrame({"method": ["MNEME", "random"], "accuracy": [1.0, 0.5],
                                       "precision": [0.5, math.nan], "f1": [2 / 3, 0.4]})
    page = render_report(data)
    summary = page[page.index('<section id="summary">'):page.index('<section id="overview">')]
    assert "<b>Predicted</b>: biology, law (verdict: concentrated)" in summary
    assert "<b>Degraded, measured</b>: biology<" in summary
    assert "<b>MNEME</b>: Acc 1.00, precision 0.50, F1 0.67 (Acc of the baselines: random 0.50)" in summary
    assert page.index('<section id="summary">') < page.index('<section id="overview">')
    # the contents links every section the page has, by its id
    contents = page[page.index("Contents:"):page.index('<section id="summary">')]
    assert [f'href="#{s}"' in contents for s in SECTIONS] == [True] * len(SECTIONS)


def test_undefined_values_read_n_a_in_every_table():
    """An undefined metric read `n/a` in the summary but was a blank cell in the metrics table, like a
    category the ground truth does not measure in the category table."""
    data, _ = _data()
    data.metrics_table = pd.DataFrame({"method": ["MNEME"], "accuracy": [math.nan], "precision": [math.nan],
                                       "n_true": [0]})
    data.category_scores = pd.DataFrame({"category": ["biology", "law", "sports"], "score": [1.2, 0.9, 0.5]})
    page = render_report(data)
    metrics = page[page.index('<section id="metrics">'):]
    assert "<td>MNEME</td><td>n/a</td><td>n/a</td><td>0</td>" in metrics
    assert "<td>sports</td><td>0.500</td><td>n/a</td><td>n/a</td><td>n/a</td>" in page  # no ground truth
    assert "<td></td>" not in page


def test_summary_of_a_run_with_several_ground_truths_names_each():
    data, _ = _data()
    scores = pd.DataFrame({"category": ["weapons", "fraud"], "score": [2.0, 0.1], "predicted": [True, False]})
    truth = pd.DataFrame({"category": ["weapons", "fraud"], "before": [1.0, 1.0], "after": [0.9, 0.2],
                          "drop": [0.1, 0.8], "degraded": [False, True]})
    metrics = pd.DataFrame({"method": ["MNEME"], "accuracy": [0.0], "recall": [0.0]})
    data.tables = [TableView("judge", "harm", scores, truth, metrics, verdict="broad")]
    page = render_report(data)
    assert "<b>Predicted (judge)</b>: weapons (verdict: broad)" in page
    assert "<b>Degraded, measured (judge)</b>: fraud<" in page
    assert "<b>MNEME (judge)</b>: Acc 0.00, recall 0.00<" in page
    assert 'href="#categories-judge"' in page and '<section id="categories-judge">' in page


def test_missing_stages_are_marked_not_run():
    page = render_report(ReportData())
    assert page.count("Not available") == len(SECTIONS)


def test_report_opens_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    data, _ = _data()
    path = write_report(data, tmp_path / "report.html")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run(flags + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "report.png"
    run = subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,5000", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 10_000


def test_a_literal_api_key_in_the_run_config_stays_out_of_the_report(tmp_path):
    """The report embeds the run's config and is made to be shared: a literal key is redacted, an
    env:NAME reference (no secret) is shown as written."""
    import yaml

    from mneme_plugin.report.build import build_report

    run = tmp_path / "run"
    run.mkdir()
    config = {"run_dir": str(run), "models": {"base": "base-model", "edited": "edited-model"},
              "corpus": {"source": "corpus.txt"}, "harvest": {"layer": 1},
              "explain": {"explainer": "default", "client": {"kind": "openai", "model": "m",
                                                            "base_url": "https://api.example.org/v1",
                                                            "api_key": "sk-proj-LITERALSECRET"}},
              "map": {"method": "llm", "client": {"kind": "openai", "model": "m", "api_key": "env:MAP_KEY"}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    html = build_report(run).read_text()
    assert "LITERALSECRET" not in html
    assert "&lt;redacted&gt;" in html and "env:MAP_KEY" in html


def test_hostile_ground_truth_names_make_safe_distinct_ids_that_the_contents_links_reach():
    """A ground-truth table's name went raw into the sections' ids: a name holding `">` closed the attribute
    and injected markup, and the contents link pointed at an id the page did not have."""
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.ids, self.links, self.headings, self._in_h2 = [], [], [], [], False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.append(tag)
            if "id" in attrs:
                self.ids.append(attrs["id"])
            if tag == "a" and attrs.get("href", "").startswith("#"):
                self.links.append(attrs["href"][1:])
            self._in_h2 = tag == "h2"

        def handle_data(self, data):
            if self._in_h2:
                self.headings.append(data)
                self._in_h2 = False

    data, _ = _data()
    scores = pd.DataFrame({"category": ["weapons"], "score": [1.0], "predicted": [True]})
    metrics = pd.DataFrame({"method": ["MNEME"], "accuracy": [1.0]})
    hostile = 'mm"><img src=x onerror=alert(1)>'
    names = [hostile, "a b", "a_b", "a.b", "judge"]
    data.tables = [TableView(name, "harm", scores, None, metrics) for name in names]
    page = render_report(data)
    assert "<img" not in page
    parsed = Page()
    parsed.feed(page)
    assert "img" not in parsed.tags
    # every id is unique and a plain slug; every contents link reaches a section of the page
    assert len(parsed.ids) == len(set(parsed.ids))
    assert all(c.isascii() and (c.isalnum() or c in "_-") for i in parsed.ids for c in i)
    assert parsed.links and set(parsed.links) <= set(parsed.ids)
    assert len(parsed.links) == len(SECTIONS) - 2 + 2 * len(names)  # categories / metrics once per table
    # five distinct names, five distinct pairs of sections; a plain name keeps its readable id
    assert sum(i.startswith("categories-") for i in parsed.ids) == len(names)
    assert sum(i.startswith("metrics-") for i in parsed.ids) == len(names)
    assert "categories-judge" in parsed.ids and "categories-a_b" in parsed.ids
    # the name itself still reads as written in the headings
    assert f"Predicted and observed side effects — {hostile} (taxonomy harm)" in parsed.headings
