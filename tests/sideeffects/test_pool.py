import pandas as pd
import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.sideeffects import PredictConfig, load_prediction, predict
from mneme_plugin.sideeffects.pool import pool_predictions
from mneme_plugin.sideeffects.steps import pool_runs

CATEGORIES = ["biology", "law", "history", "cooking"]


def _prediction(suppressed_categories):
    """A prediction of the min_score rule whose predicted set is exactly ``suppressed_categories``."""
    attribution = pd.DataFrame({"latent": range(len(CATEGORIES)), "score": [0.5] * len(CATEGORIES),
                                "latent_class": ["suppressed" if c in suppressed_categories else "shared"
                                                 for c in CATEGORIES]})
    links = pd.DataFrame({"latent": range(len(CATEGORIES)), "category": CATEGORIES, "similarity": [0.9] * 4})
    return predict(attribution, links, CATEGORIES, PredictConfig(rule="min_score", min_score=0.0))


def test_majority_vote_keeps_what_most_crosscoders_name():
    runs = [_prediction({"law", "history"}), _prediction({"law"}), _prediction({"law", "cooking"})]
    assert [sorted(r.predicted) for r in runs] == [["history", "law"], ["law"], ["cooking", "law"]]
    pooled = pool_predictions(runs)
    assert pooled.predicted == ["law"]
    votes = pooled.scores.set_index("category")["votes"].to_dict()
    assert votes == {"law": 3, "history": 1, "cooking": 1, "biology": 0}
    assert sorted(pool_predictions(runs, min_votes=1).predicted) == ["cooking", "history", "law"]
    assert pooled.tests["min_votes"] == 2
    with pytest.raises(ConfigError, match="min_votes"):
        pool_predictions(runs, min_votes=4)
    with pytest.raises(ConfigError, match="at least 2"):
        pool_predictions(runs[:1])


def test_pool_runs_refuses_runs_of_different_edits(tmp_path, caplog):
    import yaml

    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.predict import save_prediction

    dirs = []
    for i, (edited, predicted) in enumerate([("e1", {"law"}), ("e1", {"law", "history"}), ("e2", {"law"})]):
        run = tmp_path / f"run{i}"
        layout = RunLayout(run)
        run.mkdir()
        layout.config.write_text(yaml.safe_dump({"run_dir": str(run), "models": {"base": "b", "edited": edited},
                                                 "corpus": {"source": "corpus.txt"}, "harvest": {"layer": 0},
                                                 "map": {"taxonomies": ["organism"]}, "training": {"seed": i}}))
        save_prediction(_prediction(predicted), layout.prediction)
        dirs.append(run)
    pooled = pool_runs(dirs[:2], tmp_path / "pooled")
    assert pooled.predicted == ["law"]  # history: 1 of 2, not a majority
    # Predictions of different rules are pooled, with a warning naming each run's rule.
    other_rule = _prediction({"law"})
    other_rule.config = PredictConfig(rule="top_k", k=1)
    save_prediction(other_rule, RunLayout(dirs[1]).prediction)
    with caplog.at_level("WARNING", logger="mneme_plugin"):
        pool_runs(dirs[:2], tmp_path / "mixed")
    assert "different rules" in caplog.text and f"{dirs[1]}: top_k" in caplog.text
    assert load_prediction(RunLayout(tmp_path / "pooled").prediction).predicted == ["law"]
    with pytest.raises(ConfigError, match="different models"):
        pool_runs(dirs, tmp_path / "bad")
    # The same run twice (also spelled differently) would outvote the other: refused before anything is read.
    with pytest.raises(ConfigError, match="more than once"):
        pool_runs([dirs[1], dirs[0], tmp_path / "." / "run1"], tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    # Two folders of one crosscoder (same settings and training seed) would vote twice as well.
    (tmp_path / "copy").mkdir()
    RunLayout(tmp_path / "copy").config.write_text(RunLayout(dirs[0]).config.read_text())
    save_prediction(_prediction({"law"}), RunLayout(tmp_path / "copy").prediction)
    with pytest.raises(ConfigError, match="train the same crosscoder"):
        pool_runs([dirs[0], tmp_path / "copy"], tmp_path / "same")


def test_mneme_pool_then_evaluate_on_the_command_line(tmp_path):
    import yaml
    from click.testing import CliRunner

    from mneme_plugin.cli import main
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.predict import save_prediction

    dirs = []
    for i, predicted in enumerate([{"law", "history"}, {"law"}, {"law", "history", "cooking"}]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        layout = RunLayout(run)
        layout.config.write_text(yaml.safe_dump({"run_dir": str(run),
                                                 "models": {"base": "b", "edited": "e",
                                                            "intervention": "RMU unlearning of law knowledge"},
                                                 "corpus": {"source": "corpus.txt"}, "harvest": {"layer": 0},
                                                 "map": {"taxonomies": ["organism"]},
                                                 "evaluate": {"drop_threshold": 0.2}, "training": {"seed": i}}))
        save_prediction(_prediction(predicted), layout.prediction)
        dirs.append(str(run))
    result = CliRunner().invoke(main, ["pool", *dirs, "--out", str(tmp_path / "pooled")])
    assert result.exit_code == 0, result.output
    assert "Predicted: law, history" in result.output and "cooking" in result.output
    # Only the categories some run predicted are listed (biology: none), then how many others there are.
    assert "biology" not in result.output and "(1 other category: no run predicted it)" in result.output
    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nbiology,0.9,0.9\nlaw,0.9,0.1\nhistory,0.9,0.9\ncooking,0.9,0.75\n")
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(tmp_path / "pooled"), "--scores-csv", str(truth)])
    assert result.exit_code == 0, result.output
    # The pooled folder is scored with its runs' settings: their drop threshold 0.2 (cooking's 0.15 is
    # not degraded; the default 0.02 would count it) and the naive baseline from their edit's
    # description in their taxonomy (it names law).
    assert "Degraded: law\n" in result.output
    naive = [line for line in result.output.splitlines() if line.startswith("| naive")][0]
    assert naive.split("|")[2].strip() == "1.000"
    report = CliRunner().invoke(main, ["report", "--run-dir", str(tmp_path / "pooled")])
    assert report.exit_code == 0, report.output
    assert "law" in (tmp_path / "pooled" / "report.html").read_text()
    # Pooling again into the same folder replaces the prediction and drops the evaluation and report of the old one.
    result = CliRunner().invoke(main, ["pool", dirs[1], dirs[2], "--out", str(tmp_path / "pooled")])
    assert result.exit_code == 0, result.output
    pooled = RunLayout(tmp_path / "pooled")
    assert load_prediction(pooled.prediction).predicted == ["law"]  # history: 1 of 2 now
    assert not pooled.evaluation.exists() and not pooled.report.exists()
    result = CliRunner().invoke(main, ["pool", dirs[0], "--out", str(tmp_path / "one")])
    assert result.exit_code != 0 and "at least 2" in result.output
    # A pooled run as --out would have its own prediction replaced by the vote (and vote with it next time).
    before = (RunLayout(dirs[2]).prediction / "predictions.json").read_text()
    result = CliRunner().invoke(main, ["pool", *dirs, "--out", dirs[2]])
    assert result.exit_code != 0 and "one of the pooled runs" in result.output, result.output
    result = CliRunner().invoke(main, ["pool", dirs[0], dirs[1], "--out", dirs[2]])
    assert result.exit_code != 0 and "a `mneme run` directory" in result.output, result.output
    assert (RunLayout(dirs[2]).prediction / "predictions.json").read_text() == before


def test_evaluate_without_config_reads_the_run_directorys_own_sections(tmp_path):
    # A run over the organism taxonomy with drop_threshold 0.2: `mneme evaluate --run-dir` uses both
    # (the naive baseline maps the description onto the run's taxonomy, not the default MMLU).
    import yaml
    from click.testing import CliRunner

    from mneme_plugin.cli import main
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.predict import save_prediction

    run = tmp_path / "run"
    run.mkdir()
    layout = RunLayout(run)
    layout.config.write_text(yaml.safe_dump({"run_dir": str(run), "models": {"base": "b", "edited": "e"},
                                             "corpus": {"source": "corpus.txt"}, "harvest": {"layer": 0},
                                             "map": {"taxonomies": ["organism"]},
                                             "evaluate": {"drop_threshold": 0.2}}))
    save_prediction(_prediction({"law"}), layout.prediction)
    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nbiology,0.9,0.9\nlaw,0.9,0.1\nhistory,0.9,0.75\ncooking,0.9,0.9\n")
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run), "--scores-csv", str(truth),
                                       "--intervention", "RMU unlearning of law knowledge"])
    assert result.exit_code == 0, result.output
    assert "Degraded: law\n" in result.output  # history's 0.15 is below the run's threshold
    naive = [line for line in result.output.splitlines() if line.startswith("| naive")][0]
    assert naive.split("|")[2].strip() == "1.000"  # naive names law, in the organism taxonomy


def test_a_ground_truth_that_misses_the_taxonomy_is_refused(tmp_path):
    """Categories spelt otherwise than the taxonomy ('Law') would score nothing: refused with the near
    miss; a negative question count is refused too."""
    import yaml
    from click.testing import CliRunner

    from mneme_plugin.cli import main
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.predict import save_prediction

    run = tmp_path / "run"
    run.mkdir()
    RunLayout(run).config.write_text(yaml.safe_dump({"run_dir": str(run), "models": {"base": "b", "edited": "e"},
                                                     "corpus": {"source": "corpus.txt"}, "harvest": {"layer": 0},
                                                     "map": {"taxonomies": ["organism"]}}))
    save_prediction(_prediction({"law"}), RunLayout(run).prediction)
    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nLaw,0.9,0.1\nHistory,0.9,0.9\n")
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run), "--scores-csv", str(truth)])
    assert result.exit_code != 0 and "share none with the prediction's taxonomy" in result.output
    assert "Did you mean 'law' for 'Law', 'history' for 'History'?" in result.output
    truth.write_text("category,before,after,n\nlaw,0.9,0.1,-3\n")
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run), "--scores-csv", str(truth)])
    assert result.exit_code != 0 and "must hold positive whole numbers; categories ['law']" in result.output


def test_evaluate_without_a_ground_truth_scores_against_the_runs_own(tmp_path):
    """`mneme evaluate --run-dir D --drop-threshold 0.2` on a run whose config names its ground truth said
    "No ground truth" (its --config help said the run's ground_truth section was read): it is now used."""
    import yaml
    from click.testing import CliRunner

    from mneme_plugin.cli import main
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.sideeffects.predict import save_prediction

    truth = tmp_path / "truth.csv"
    truth.write_text("category,before,after\nbiology,0.9,0.9\nlaw,0.9,0.1\nhistory,0.9,0.75\ncooking,0.9,0.9\n")
    run = tmp_path / "run"
    run.mkdir()
    base = {"run_dir": str(run), "models": {"base": "b", "edited": "e"}, "corpus": {"source": "corpus.txt"},
            "harvest": {"layer": 0}, "map": {"taxonomies": ["organism"]}}
    RunLayout(run).config.write_text(yaml.safe_dump({**base, "ground_truth": {"scores_csv": str(truth)}}))
    save_prediction(_prediction({"law"}), RunLayout(run).prediction)
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run), "--drop-threshold", "0.2"])
    assert result.exit_code == 0, result.output
    assert f"Ground truth: the run's own ({truth})." in result.output and "Degraded: law\n" in result.output
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run)])  # the default threshold: history too
    assert "Degraded: law, history\n" in result.output, result.output
    # A run whose truth is in named tables is scored by `mneme run`: the message says where they are.
    RunLayout(run).config.write_text(yaml.safe_dump({**base, "ground_truth": {"tables": {
        "gt": {"taxonomy": "organism", "scores_csv": str(truth)}}}}))
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run)])
    assert result.exit_code != 0 and "the run's own is in named tables (gt)" in result.output, result.output
    assert f"{run / 'ground_truth'}/NAME.csv" in result.output
    # Without any ground truth the message is as before.
    RunLayout(run).config.write_text(yaml.safe_dump(base))
    result = CliRunner().invoke(main, ["evaluate", "--run-dir", str(run)])
    assert result.exit_code != 0 and "No ground truth: pass --scores-csv" in result.output
