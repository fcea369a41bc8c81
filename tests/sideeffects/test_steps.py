"""The predict and evaluate steps of a run directory (``sideeffects.steps``) through the commands, on stage
outputs built by ``tests.helpers`` (no training)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.layout import RunLayout
from mneme_plugin.sideeffects import load_prediction
from tests.helpers import write_attribution, write_mapping

DOMAINS = ["biology", "chemistry", "cooking", "history", "law", "medicine", "security", "sports"]


def _hand_built_run(root, taxonomy="organism"):
    """attribution/ and mapping/ of a run without config.yaml: latents 0-1 suppressed on law, 2-3 amplified
    (edited_only) on biology, 16 shared latents spread over every category."""
    run = RunLayout(root)
    classes = ["suppressed"] * 2 + ["edited_only"] * 2 + ["shared"] * 16
    links = ({0: [("law", 0.9)], 1: [("law", 0.9)], 2: [("biology", 0.9)], 3: [("biology", 0.9)]}
             | {4 + i: [(DOMAINS[i % 8], 0.8)] for i in range(16)})
    write_attribution(run.attribution, classes, scores=[0.6, 0.6, -0.9, -0.9] + [0.0] * 16)
    write_mapping(run.mapping, links, taxonomy)
    return run


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("name, content, missing", [
    ("evaluation", {}, "'metrics'"),
    ("evaluation", {"metrics": {"MNEME": {"accuracy": 1.0}}, "truth": [], "predicted": {}}, "metrics 'MNEME'"),
    ("evaluation", {"metrics": {}, "truth": [{"category": "law"}], "predicted": {}}, "'degraded'"),
    ("evaluation", [], "a JSON list"),
    ("prediction", {"predicted": []}, "'scores'"),
    ("prediction", {"predicted": [], "scores": [{"category": "law"}], "evidence": {}, "config": {}}, "'score'"),
    ("prediction", {"predicted": [], "scores": [], "evidence": {}, "config": {"rule": "best"}}, "rule must be"),
])
def test_a_stage_json_of_another_shape_is_left_out_of_report_and_info_with_its_problem(tmp_path, name, content,
                                                                                       missing):
    """Valid JSON of the wrong shape (`{}` written by hand) crashed `mneme report` and `mneme info` with a
    KeyError traceback; report/build.py promises such a file is left out with a warning."""
    from mneme_plugin.sideeffects import PredictConfig, predict_run

    run = _hand_built_run(tmp_path / "run")
    predict_run(run.root, PredictConfig(rule="top_k", k=1), "organism")
    if name == "evaluation":
        run.evaluation.mkdir()
        path = run.evaluation / "evaluation.json"
    else:
        path = run.prediction / "predictions.json"
    path.write_text(json.dumps(content))
    report = _invoke("report", "--run-dir", run.root)  # the command's log lines are in its output
    assert report.exit_code == 0, report.output
    assert f"left out of the report: {path} is not a stage's file" in report.output and missing in report.output
    info = _invoke("info", run.root)
    assert info.exit_code == 0, info.output  # the rest of the run is still summarised
    assert str(path) in info.output and missing in info.output, info.output
