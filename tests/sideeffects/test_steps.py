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


def _marked_run(root):
    """A `mneme run` directory (config.yaml mapping to organism, every stage marked done) over the hand-built
    stage outputs."""
    import yaml

    from mneme_plugin.pipeline.stages import STAGES

    run = _hand_built_run(root)
    run.config.write_text(yaml.safe_dump({"run_dir": str(run.root), "models": {"base": "b", "edited": "e"},
                                          "corpus": {"source": "corpus.txt"}, "harvest": {"layer": 0},
                                          "map": {"taxonomies": ["organism"]}}))
    run.stages.mkdir()
    for stage in STAGES:
        run.stage_marker(stage.name).write_text("{}")
    return run, [stage.name for stage in STAGES]


def test_a_refused_predict_or_evaluate_leaves_the_runs_stage_markers(tmp_path):
    """`mneme predict` / `mneme evaluate` refused before writing anything removed the predict, evaluate and report
    markers all the same: `mneme run` then redid those stages and the command said they were no longer done."""
    run, stages = _marked_run(tmp_path / "run")

    def marked():
        return sorted(p.stem for p in run.stages.glob("*.json"))

    refused = _invoke("predict", "--run-dir", run.root, "--taxonomy", "mmlu")  # not mapped to mmlu
    assert refused.exit_code != 0 and "not mapped to taxonomy 'mmlu'" in refused.output, refused.output
    assert "no longer marked done" not in refused.output and marked() == sorted(stages)
    assert not run.prediction.exists()
    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nLaw,0.9,0.1\n")  # shares no category with the taxonomy
    from mneme_plugin.sideeffects import PredictConfig, predict_run

    predict_run(run.root, PredictConfig(rule="top_k", k=1), "organism")
    refused = _invoke("evaluate", "--run-dir", run.root, "--scores-csv", truth)
    assert refused.exit_code != 0 and "share none with the prediction's taxonomy" in refused.output, refused.output
    assert "no longer marked done" not in refused.output and marked() == sorted(stages)
    assert not run.evaluation.exists()
    # Done: the markers of the stage and of the later ones go, as before.
    truth.write_text("category,before,after\nlaw,0.9,0.1\nbiology,0.9,0.9\n")
    result = _invoke("evaluate", "--run-dir", run.root, "--scores-csv", truth)
    assert result.exit_code == 0 and "its stage(s) evaluate, report are no longer marked done" in result.output
    assert marked() == sorted(set(stages) - {"evaluate", "report"})
    result = _invoke("predict", "--run-dir", run.root, "--rule", "top_k", "-k", "1")
    assert result.exit_code == 0 and "its stage(s) predict are no longer marked done" in result.output, result.output
    assert marked() == sorted(set(stages) - {"predict", "evaluate", "report"})


def test_predict_in_a_folder_without_config_writes_the_mapped_taxonomys_prediction_where_evaluate_reads_it(tmp_path):
    """Without config.yaml the run's own taxonomy was map's default (mmlu): `mneme predict` refused the
    mapped one, and `--taxonomy organism` wrote prediction/organism/, which `mneme evaluate`, the report and
    gather never read ("prediction/predictions.json does not exist")."""
    import pandas as pd

    from mneme_plugin.interpret.mapping import save_mapping
    from mneme_plugin.report.build import gather
    from tests.helpers import mapping_table

    run = _hand_built_run(tmp_path / "run")
    result = _invoke("predict", "--run-dir", run.root, "--rule", "top_k", "-k", "2")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "Predicted: biology, law"
    assert sorted(load_prediction(run.prediction).predicted) == ["biology", "law"]
    assert not (run.prediction / "organism").exists()
    # Naming the taxonomy (by name or by its file) writes the same place.
    from importlib import resources

    taxonomy_file = resources.files("mneme_plugin") / "data" / "taxonomies" / "organism.yaml"
    for name in ("organism", str(taxonomy_file)):
        result = _invoke("predict", "--run-dir", run.root, "--taxonomy", name, "--rule", "top_k", "-k", "1")
        assert result.exit_code == 0, result.output
        assert load_prediction(run.prediction).predicted == ["biology"] and not (run.prediction / "organism").exists()
    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nlaw,0.9,0.2\nbiology,0.8,0.3\nsports,0.7,0.7\n")
    result = _invoke("evaluate", "--run-dir", run.root, "--scores-csv", truth)
    assert result.exit_code == 0, result.output
    assert "Degraded: law, biology" in result.output
    data = gather(run.root)
    assert data.metrics_table is not None and list(data.category_scores["category"])[:1] == ["biology"]
    # A mapping of two taxonomies: the first is the folder's own (prediction/), the other goes beside it.
    links = {0: [("law", 0.9)], 1: [("law", 0.9)], 2: [("biology", 0.9)], 3: [("biology", 0.9)]}
    behaviour = mapping_table({0: [("fraud", 0.9)]}, "organism_behaviour")
    save_mapping(pd.concat([mapping_table(links, "organism"), behaviour], ignore_index=True), run.mapping)
    result = _invoke("predict", "--run-dir", run.root, "--taxonomy", "organism_behaviour", "--rule", "top_k", "-k", "1")
    assert result.exit_code == 0, result.output
    assert load_prediction(run.prediction / "organism_behaviour").predicted == ["fraud"]
    assert load_prediction(run.prediction).predicted == ["biology"]  # the folder's own prediction stays


def _truth_with_rows_outside(tmp_path):
    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nlaw,0.9,0.2\nbiology,0.9,0.9\nsports,0.7,0.1\ncooking,0.6,0.6\n"
                     "wmdp_bio,0.7,0.3\nLaw ,0.9,0.1\n")
    return truth


def test_evaluate_scores_only_the_ground_truth_rows_of_the_predictions_taxonomy(tmp_path):
    """`mneme evaluate --run-dir` counted rows outside the taxonomy (wmdp_bio, a misspelt 'Law ') as degraded
    categories: "Degraded: law, sports, wmdp_bio, Law", MNEME Acc 0.25 and an oracle of 4. They are kept as
    `outside` and named in a warning (with the near miss), as evaluate_tables does for named tables."""
    from mneme_plugin.sideeffects import load_evaluation

    run = _hand_built_run(tmp_path / "run")
    assert _invoke("predict", "--run-dir", run.root, "--taxonomy", "organism", "--rule", "top_k", "-k", "2").exit_code == 0
    assert sorted(load_prediction(run.prediction).predicted) == ["biology", "law"]
    result = _invoke("evaluate", "--run-dir", run.root, "--scores-csv", _truth_with_rows_outside(tmp_path))
    assert result.exit_code == 0, result.output
    assert "Degraded: law, sports\n" in result.output
    assert ("The ground truth has categories outside taxonomy 'organism', not scored (kept in the evaluation as outside): "
            "'wmdp_bio', 'Law'. Did you mean 'law' for 'Law'?") in result.output
    evaluation = load_evaluation(run.evaluation)
    # law and sports degraded; MNEME named law and biology: Eq. 4 accuracy 1/2, precision 1/2.
    assert evaluation.rows["MNEME"].accuracy == pytest.approx(0.5) and evaluation.rows["MNEME"].precision == 0.5
    assert evaluation.rows["oracle"].n_true == 2 and evaluation.rows["MNEME"].n_true == 2
    assert sorted(evaluation.truth["category"]) == ["biology", "cooking", "law", "sports"]
    assert [row["category"] for row in evaluation.outside] == ["wmdp_bio", "Law"]
    # The report shows them, not scored, as it does for named tables.
    from mneme_plugin.report.build import gather
    from mneme_plugin.report.html import render_report

    page = render_report(gather(run.root))
    assert "Not scored (outside the taxonomy):" in page and "<td>wmdp_bio</td>" in page and "<td>Law</td>" in page


def test_a_named_tables_rows_outside_its_taxonomy_are_named_in_a_warning_and_a_table_with_none_refused(tmp_path,
                                                                                                     caplog):
    """Named tables (`ground_truth.tables`) and the single ground truth split their rows by one rule: rows
    outside the prediction's taxonomy are kept as `outside` and named in a warning with the near miss (a
    table's were dropped silently), and a table with no row inside is refused, naming the table and its
    `categories` mapping."""
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.groundtruth.sources import RunGroundTruthConfig, table_path
    from mneme_plugin.interpret import MapConfig
    from mneme_plugin.sideeffects import EvaluateConfig, PredictConfig, predict_run
    from mneme_plugin.sideeffects.steps import evaluate_tables

    run = _hand_built_run(tmp_path / "run")
    predict_run(run.root, PredictConfig(rule="top_k", k=2), "organism")
    run.ground_truth.mkdir(parents=True)
    table_path(run.ground_truth, "knowledge").write_text(_truth_with_rows_outside(tmp_path).read_text())
    truth = RunGroundTruthConfig(tables={"knowledge": {"taxonomy": "organism", "scores_csv": "unused.csv"}})
    with caplog.at_level("WARNING", logger="mneme_plugin"):
        evaluation = evaluate_tables(run.root, EvaluateConfig(), truth, MapConfig(), ["organism"])["knowledge"]
    assert ("Ground-truth table 'knowledge' has categories outside taxonomy 'organism', not scored (kept in the "
            "evaluation as outside): 'wmdp_bio', 'Law'. Did you mean 'law' for 'Law'?") in caplog.text
    assert [row["category"] for row in evaluation.outside] == ["wmdp_bio", "Law"]
    assert sorted(evaluation.truth["category"]) == ["biology", "cooking", "law", "sports"]
    assert evaluation.rows["MNEME"].accuracy == pytest.approx(0.5)

    table_path(run.ground_truth, "knowledge").write_text("category,before,after\nLaw,0.9,0.1\nwmdp_bio,0.7,0.3\n")
    with pytest.raises(ConfigError) as refused:
        evaluate_tables(run.root, EvaluateConfig(), truth, MapConfig(), ["organism"])
    message = str(refused.value)
    assert message.startswith("The categories of ground-truth table 'knowledge' (['Law', 'wmdp_bio']) share none with the "
                              "prediction's taxonomy (taxonomy 'organism': ")
    assert "Did you mean 'law' for 'Law'?" in message and "the table's `categories` mapping" in message


def test_the_naive_baseline_maps_the_edit_onto_the_predictions_own_taxonomy(tmp_path):
    """The naive baseline used map.taxonomies[0], mmlu in a folder without config.yaml, whatever the prediction's
    taxonomy: it named MMLU subjects and scored 0 against an organism ground truth. predictions.json now records
    its taxonomy; a file written before it did is matched to the taxonomy with exactly its categories."""
    from mneme_plugin.sideeffects import load_evaluation
    from mneme_plugin.sideeffects.pool import pool_predictions

    run = _hand_built_run(tmp_path / "run")
    assert _invoke("predict", "--run-dir", run.root, "--taxonomy", "organism", "--rule", "top_k", "-k", "2").exit_code == 0
    written = json.loads((run.prediction / "predictions.json").read_text())
    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nlaw,0.9,0.2\nbiology,0.9,0.9\nsports,0.7,0.1\ncooking,0.6,0.6\n")
    args = ("evaluate", "--run-dir", run.root, "--scores-csv", truth, "--intervention",
            "unlearning of law and legal knowledge")
    for recorded in (True, False):
        if not recorded:  # a predictions.json of an earlier version
            assert written.pop("taxonomy") == "organism" and load_prediction(run.prediction).taxonomy == "organism"
            (run.prediction / "predictions.json").write_text(json.dumps(written))
            assert load_prediction(run.prediction).taxonomy is None
        result = _invoke(*args)
        assert result.exit_code == 0, result.output
        evaluation = load_evaluation(run.evaluation)
        # The description names law only; law and sports degraded: naive's Eq. 4 accuracy 1/2, precision 1.
        assert evaluation.predicted["naive"] == ["law"] and "naive" not in evaluation.unmeasured
        assert evaluation.rows["naive"].accuracy == pytest.approx(0.5) and evaluation.rows["naive"].precision == 1.0
    # A pooled prediction keeps its runs' taxonomy.
    organism = load_prediction(run.prediction)
    organism.taxonomy = "organism"
    assert pool_predictions([organism, organism]).taxonomy == "organism"


def test_outlier_or_broad_without_a_control_run_needs_no_contexts(tmp_path):
    """The default rule without predict.control_run is the outlier rule, yet predict_run read contexts.json
    (the reference latents only its control test uses): "contexts/contexts.json does not exist"."""
    run = _hand_built_run(tmp_path / "run")
    assert not run.contexts.exists()
    outlier = _invoke("predict", "--run-dir", run.root, "--rule", "outlier")
    assert outlier.exit_code == 0, outlier.output
    result = _invoke("predict", "--run-dir", run.root)  # the default rule, outlier_or_broad
    assert result.exit_code == 0, result.output
    prediction = load_prediction(run.prediction)
    assert prediction.config.rule == "outlier_or_broad" and prediction.tests["verdict"] == "no control: the outlier rule"
    assert "Change: no control: the outlier rule" in result.output
    assert result.output.splitlines()[-1] == outlier.output.splitlines()[-1]  # the same categories
    # The rules that do read the reference sample say why they need the contexts.
    refused = _invoke("predict", "--run-dir", run.root, "--rule", "enrichment")
    assert refused.exit_code != 0 and "contexts.json does not exist" in refused.output
    assert "The enrichment rule reads from it the uniform sample of live latents" in refused.output, refused.output
    control = _hand_built_run(tmp_path / "control")
    refused = _invoke("predict", "--run-dir", run.root, "--control-run", control.root)
    assert refused.exit_code != 0 and "contexts.json does not exist" in refused.output
    assert "The outlier_or_broad rule with a control run reads from it" in refused.output, refused.output
