import json
import math

import pandas as pd
import pytest

from mneme_plugin.groundtruth import fisher_drop_p
from mneme_plugin.sideeffects import (
    EvaluateConfig,
    degraded_categories,
    evaluate,
    random_baseline,
    set_metrics,
)


def test_set_metrics_hand_computed():
    m = set_metrics(["a", "b", "c", "d"], ["a", "b", "x"])
    assert m.accuracy == 0.5 and m.recall == 0.5  # Eq. 4: 2 of 4 true predicted
    assert m.precision == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert (m.n_true, m.n_predicted, m.n_hit) == (4, 3, 2)
    assert set_metrics(["a"], ["b"]).f1 == 0.0
    none = set_metrics(["a"], [])
    assert none.accuracy == 0.0 and math.isnan(none.precision)
    assert math.isnan(set_metrics([], ["a"]).accuracy)


def test_set_metrics_with_an_empty_side():
    # Nothing degraded but something predicted (a benign edit): every prediction is wrong, so precision and
    # F1 are 0; Eq. 4 accuracy (recall) has no denominator. Nothing predicted: accuracy 0, no precision, F1 0.
    wrong = set_metrics([], ["a", "b"])
    assert math.isnan(wrong.accuracy) and wrong.precision == 0.0 and wrong.f1 == 0.0
    missed = set_metrics(["a"], [])
    assert missed.accuracy == 0.0 and math.isnan(missed.precision) and missed.f1 == 0.0
    empty = set_metrics([], [])
    assert all(math.isnan(v) for v in (empty.accuracy, empty.precision, empty.recall, empty.f1))


def test_random_baseline_expected_accuracy_is_p():
    cats = [f"c{i}" for i in range(20)]
    m = random_baseline(["c1", "c5", "c7"], cats, p=0.5, seeds=4000, seed=1)
    assert m.accuracy == pytest.approx(0.5, abs=0.02)
    assert m.precision == pytest.approx(3 / 20, abs=0.02)
    assert random_baseline(["c1"], cats, p=0.2, seeds=4000).accuracy == pytest.approx(0.2, abs=0.02)


def test_degraded_by_threshold_and_significance():
    scores = pd.DataFrame({"category": ["a", "b", "c", "d", "e"], "before": [0.8, 0.8, 0.5, 1.0, 1.0],
                           "after": [0.5, 0.77, 0.5, 28 / 32, 27 / 32], "n": [1000, 20, 100, 32, 32]})
    out = degraded_categories(scores, EvaluateConfig(drop_threshold=0.02))
    assert out["degraded"].tolist() == [True, True, False, True, True]
    out = degraded_categories(scores, EvaluateConfig(drop_threshold=0.02, significance=0.05))
    # 3 points on 20 questions is noise; so are 4 of 32 questions lost (exact p 0.057), not 5 (0.026).
    assert out["degraded"].tolist() == [True, False, False, False, True]
    assert out.loc[0, "p_value"] < 1e-10
    assert out.loc[3, "p_value"] == pytest.approx(fisher_drop_p(1.0, 28 / 32, 32))


def test_a_drop_equal_to_the_threshold_is_not_degraded():
    # "drops by more than drop_threshold" (EvaluateConfig; the demo's "drop > 0.1"); binary fractions, so the
    # drops are exact: 0.25, 0.25 + 2**-10 and 0.25 - 2**-10 against a threshold of 0.25.
    scores = pd.DataFrame({"category": ["equal", "above", "below"], "before": [0.75, 0.75, 0.75],
                           "after": [0.5, 0.5 - 2**-10, 0.5 + 2**-10]})
    out = degraded_categories(scores, EvaluateConfig(drop_threshold=0.25))
    assert out["drop"].tolist() == [0.25, 0.25 + 2**-10, 0.25 - 2**-10]
    assert out["degraded"].tolist() == [False, True, False]


def test_a_p_value_equal_to_the_significance_level_is_significant():
    # "significant at that level": p <= significance (as the prediction rules' p <= alpha, and as
    # Benjamini-Hochberg defines its q-values); 2**-5 and its neighbours are exact binary fractions.
    scores = pd.DataFrame({"category": ["equal", "above", "below"], "before": [0.9] * 3, "after": [0.5] * 3,
                           "p_value": [2**-5, 2**-5 + 2**-12, 2**-5 - 2**-12]})
    out = degraded_categories(scores, EvaluateConfig(drop_threshold=0.1, significance=2**-5))
    assert out["degraded"].tolist() == [True, False, True]


def test_significance_uses_the_ground_truths_own_test(caplog):
    # The table's p-value (e.g. McNemar on paired answers) wins over the one its counts would give;
    # a category with neither a p-value nor a count is judged by the threshold alone, with a warning.
    scores = pd.DataFrame({"category": ["paired", "counted", "bare"], "before": [0.9, 0.9, 0.9],
                           "after": [0.5, 0.5, 0.5], "n": [200, 200, None], "p_value": [0.3, None, None]})
    with caplog.at_level("WARNING", logger="mneme_plugin"):
        out = degraded_categories(scores, EvaluateConfig(drop_threshold=0.1, significance=0.05))
    assert out["degraded"].tolist() == [False, True, True]
    assert out.loc[0, "p_value"] == 0.3 and math.isnan(out.loc[2, "p_value"])
    assert "bare" in caplog.text and "paired" not in caplog.text


def test_evaluation_table_has_all_methods(tmp_path):
    scores = pd.DataFrame({"category": list("abcdef"), "before": [0.9] * 6, "after": [0.5, 0.5, 0.9, 0.9, 0.9, 0.9]})
    ev = evaluate(["a", "c"], scores, naive_predicted=["c"], config=EvaluateConfig(random_seeds=200))
    table = ev.table().set_index("method")
    assert list(table.index) == ["MNEME", "random", "naive", "oracle"]
    assert table.loc["MNEME", "accuracy"] == 0.5 and table.loc["naive", "accuracy"] == 0.0
    assert table.loc["oracle", "f1"] == 1.0
    assert "| MNEME | 0.500 |" in ev.markdown()


def test_categories_without_ground_truth_are_reported_not_scored(tmp_path):
    """A taxonomy broader than its ground truth (the EM taxonomy's 12 categories, 8 questions): a
    prediction there is neither a hit nor a false positive, and random never draws it."""
    from mneme_plugin.sideeffects.evaluate import load_evaluation, save_evaluation

    scores = pd.DataFrame({"category": ["a", "b"], "before": [0.9, 0.9], "after": [0.5, 0.4]})  # both degraded
    ev = evaluate(["a", "x"], scores, categories=["a", "b", "x", "y"], naive_predicted=["y"],
                  config=EvaluateConfig(random_seeds=200))
    rows = ev.table().set_index("method")
    assert rows.loc["MNEME", "precision"] == 1.0 and rows.loc["MNEME", "accuracy"] == 0.5
    assert rows.loc["MNEME", "n_predicted"] == 1
    assert rows.loc["random", "precision"] == 1.0  # it draws from a and b only, both degraded
    assert rows.loc["naive", "n_predicted"] == 0
    assert ev.predicted == {"MNEME": ["a", "x"], "naive": ["y"]}
    assert ev.unmeasured == {"MNEME": ["x"], "naive": ["y"]}
    assert "MNEME also predicted x: no ground truth there, not scored." in ev.markdown()
    assert load_evaluation(save_evaluation(ev, tmp_path)).unmeasured == ev.unmeasured
    measured_only = evaluate(["a"], scores, categories=["a", "b"])
    assert measured_only.unmeasured == {} and measured_only.table().equals(
        evaluate(["a", "x"], scores, categories=["a", "b", "x"]).table())



def test_undefined_metrics_read_n_a_and_are_stored_as_null(tmp_path):
    """Nothing degraded and nothing predicted: Eq. 4 accuracy and precision are undefined (and so is
    every p-value without n). The table printed `nan` there (the report `n/a` or a blank cell) and
    evaluation.json held `NaN`, which is not JSON (strict readers refuse it)."""
    from mneme_plugin.sideeffects.evaluate import EVALUATION_JSON, METRICS_CSV, load_evaluation, save_evaluation

    scores = pd.DataFrame({"category": ["a", "b"], "before": [0.9, 0.8], "after": [0.9, 0.8]})
    ev = evaluate([], scores, config=EvaluateConfig(random_seeds=50, significance=0.05))
    assert "| MNEME | n/a | n/a | n/a | n/a | 0 | 0 |" in ev.markdown() and "nan" not in ev.markdown()

    save_evaluation(ev, tmp_path)

    def refuse(constant):
        raise AssertionError(f"{constant} in {EVALUATION_JSON}")

    stored = json.loads((tmp_path / EVALUATION_JSON).read_text(), parse_constant=refuse)
    assert stored["metrics"]["MNEME"]["accuracy"] is None and stored["metrics"]["MNEME"]["precision"] is None
    assert [row["p_value"] for row in stored["truth"]] == [None, None]
    assert (tmp_path / METRICS_CSV).read_text().splitlines()[1] == "MNEME,,,,,0,0,0"  # CSV: empty cells
    # What was undefined comes back NaN (a column of None would print "None" in the report).
    loaded = load_evaluation(tmp_path)
    pd.testing.assert_frame_equal(loaded.table(), ev.table())
    pd.testing.assert_frame_equal(loaded.truth, ev.truth)
    assert loaded.markdown() == ev.markdown()


def test_evaluate_from_python_checks_its_inputs_as_the_command_line_does():
    """From Python, a string prediction was read letter by letter (predicted a, l, w: Acc 0, no error), scores
    given in percent were scored (the CSV reader refuses them), and a table without `after` was a bare KeyError."""
    import pandas as pd

    from mneme_plugin.errors import ConfigError
    from mneme_plugin.sideeffects.evaluate import evaluate

    truth = pd.DataFrame({"category": ["law", "history"], "before": [0.9, 0.8], "after": [0.2, 0.8], "n": [32, 32]})
    assert evaluate(["law"], truth).rows["MNEME"].accuracy == 1.0
    with pytest.raises(ConfigError, match="got a string"):
        evaluate("law", truth)
    with pytest.raises(ConfigError, match=r"scores in \[0, 1\].*not\s+90"):
        evaluate(["law"], truth.assign(before=[90, 80], after=[20, 80]))
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['after'\]"):
        evaluate(["law"], truth.drop(columns="after"))
