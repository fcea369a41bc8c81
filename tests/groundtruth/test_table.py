"""The ground-truth table's lm-eval reader and its drop tests."""

import json
import math
from fractions import Fraction
from itertools import combinations

import pytest

from mneme_plugin.groundtruth import drop_test, fisher_drop_p, read_lm_eval_results, scores_from_lm_eval, z_test_p


def test_lm_eval_results_are_read(tmp_path):
    def write(name, accs):
        data = {"results": {f"mmlu_{k}": {"alias": k, "acc,none": v, "acc_stderr,none": 0.01} for k, v in accs.items()},
                "n-samples": {f"mmlu_{k}": {"original": 100, "effective": 100} for k in accs}}
        (tmp_path / name).write_text(json.dumps(data))
        return tmp_path / name

    before = write("b.json", {"virology": 0.6, "anatomy": 0.5})
    after = write("a.json", {"virology": 0.3, "anatomy": 0.5})
    frame = read_lm_eval_results(before)
    assert set(frame["category"]) == {"virology", "anatomy"} and set(frame["n"]) == {100}
    scores = scores_from_lm_eval(before, after).set_index("category")
    assert scores.loc["virology", "after"] == 0.3
    # The same reader as `mneme groundtruth lm-eval` (table_from_results): the drop's test from lm-eval's
    # standard errors (z = 0.3 / (0.01 * sqrt 2), far out), and a group aggregate without sample
    # counts ("mmlu", lm-eval's mean over subjects) is no category.
    assert scores.loc["virology", "test"] == "z" and scores.loc["virology", "p_value"] < 1e-6
    assert scores.loc["anatomy", "p_value"] == 0.5
    for path in (before, after):
        data = json.loads(path.read_text())
        data["results"]["mmlu"] = {"acc,none": 0.55}
        path.write_text(json.dumps(data))
    assert set(scores_from_lm_eval(before, after)["category"]) == {"virology", "anatomy"}


def _mmlu_results(accs, layout):
    """lm-eval results of a run of the ``mmlu`` group cut to two subjects, as lm-eval writes them:
    ``results`` holds the subjects and the groups above them (``mmlu``, ``mmlu_stem``, ``mmlu_other``,
    each lm-eval's mean of its subtasks), ``groups`` the groups' rows again and ``group_subtasks`` each
    group's children. lm-eval 0.4.0 / 0.4.1 write no ``n-samples`` and list every task in
    ``group_subtasks`` (a subject with []); later versions add ``n-samples`` (subjects only) and list
    the groups only."""
    subjects = {"mmlu_anatomy": "mmlu_stem", "mmlu_virology": "mmlu_other"}
    results = {task: {"alias": f"  - {task[5:]}", "acc,none": accs[task[5:]], "acc_stderr,none": 0.05}
               for task in subjects}
    mean = sum(accs.values()) / len(accs)
    groups = {"mmlu": {"alias": "mmlu", "acc,none": mean, "acc_stderr,none": 0.03},
              **{group: {"alias": f" - {group[5:]}", "acc,none": accs[task[5:]], "acc_stderr,none": 0.05}
                 for task, group in subjects.items()}}
    tree = {"mmlu": ["mmlu_stem", "mmlu_other"], "mmlu_stem": ["mmlu_anatomy"], "mmlu_other": ["mmlu_virology"]}
    data = {"results": {**groups, **results}, "groups": groups, "configs": {}, "versions": {}}
    if layout == "0.4.0":
        data["group_subtasks"] = {**tree, **dict.fromkeys(subjects, [])}
    else:
        data["group_subtasks"] = tree
        data["n-samples"] = {task: {"original": 100, "effective": 100} for task in subjects}
    return data


@pytest.mark.parametrize("layout", ["0.4.0", "0.4.13"])
def test_lm_eval_group_rows_are_no_categories(tmp_path, layout):
    """A group (``mmlu``, ``mmlu_stem``) is lm-eval's mean over its subtasks, not a category beside
    them: it is skipped whether or not the file has sample counts (it was counted when it had none)."""
    from mneme_plugin.groundtruth.table import table_from_results

    before = _mmlu_results({"anatomy": 0.6, "virology": 0.7}, layout)
    after = _mmlu_results({"anatomy": 0.5, "virology": 0.2}, layout)
    table = table_from_results(before, after)
    assert sorted(table["category"]) == ["anatomy", "virology"]
    (tmp_path / "b.json").write_text(json.dumps(before))
    assert sorted(read_lm_eval_results(tmp_path / "b.json")["category"]) == ["anatomy", "virology"]


def test_a_malformed_group_subtasks_is_refused(tmp_path):
    from mneme_plugin.errors import ConfigError

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": {"mmlu_law": {"acc,none": 0.5}}, "group_subtasks": ["mmlu"]}))
    with pytest.raises(ConfigError, match=r"results\.json: 'group_subtasks' is a list, expected a mapping"):
        read_lm_eval_results(path)


@pytest.mark.parametrize("right_before,n_before,right_after,n_after", [(6, 6, 2, 6), (5, 7, 3, 5), (4, 6, 4, 6), (0, 4, 2, 5)])
def test_fisher_drop_p_is_the_permutation_tail(right_before, n_before, right_after, n_after):
    # Under 'no drop', which of the pooled items are right is exchangeable between the two groups:
    # the p-value is the share of splits of the pooled outcomes giving the before group at least as many.
    pooled = [1] * (right_before + right_after) + [0] * (n_before + n_after - right_before - right_after)
    splits = list(combinations(range(len(pooled)), n_before))
    tail = sum(sum(pooled[i] for i in split) >= right_before for split in splits)
    p = fisher_drop_p(right_before / n_before, right_after / n_after, n_before, n_after)
    assert p == pytest.approx(float(Fraction(tail, len(splits))), rel=1e-9)


def test_fisher_drop_p_on_the_organism_scale_and_its_errors():
    # 32 of 32 right, then 28: P(all 32 items of the before group are among the 60 right ones) = C(60,32) / C(64,32).
    assert fisher_drop_p(1.0, 28 / 32, 32) == pytest.approx(math.comb(60, 32) / math.comb(64, 32))
    assert fisher_drop_p(1.0, 28 / 32, 32) > 0.05 > fisher_drop_p(1.0, 27 / 32, 32)
    assert fisher_drop_p(0.5, 0.6, 40) > 0.5  # a gain is no evidence of a drop
    with pytest.raises(ValueError, match="n_before must be a whole number"):
        fisher_drop_p(0.9, 0.8, 0)
    with pytest.raises(ValueError, match="after must be a rate"):
        fisher_drop_p(0.9, 80.0, 100)


def test_drop_test_prefers_standard_errors_then_counts():
    assert drop_test(0.8, 0.5, 0.1, 0.1) == (z_test_p(0.8, 0.5, 0.1, 0.1), "z")
    assert drop_test(0.8, 0.5, None, 0.1, n=20) == (fisher_drop_p(0.8, 0.5, 20), "fisher")
    assert drop_test(0.8, 0.5) == (None, None) and drop_test(0.8, 0.5, n=float("nan")) == (None, None)


@pytest.mark.parametrize("rows, expected", [
    ("biology,0.9,0.4\n biology,0.9,0.9\n", r"categories \['biology'\] appear more than once"),
    (",0.9,0.4\nlaw,0.9,0.8\n", r"line\(s\) \[2\] have no category"),
    ("biology,90,40\nlaw,90,88\n", r"column 'before' must hold scores in \[0, 1\] .*0\.9, not 90.*\['biology', 'law'\]"),
    ("biology,inf,0.4\n", r"column 'before' must hold scores in \[0, 1\]"),
    ("biology,0.9,-0.1\n", r"column 'after' must hold scores in \[0, 1\]"),
])
def test_scores_csv_rows_that_would_give_a_wrong_evaluation_are_refused(tmp_path, rows, expected):
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.groundtruth.table import read_scores_csv

    path = tmp_path / "truth.csv"
    path.write_text("category,before,after\n" + rows)
    with pytest.raises(ConfigError, match=expected):
        read_scores_csv(path)


@pytest.mark.parametrize("rows, lines", [
    ("biology,0.9,0.4,0.5\nlaw,0.7,0.6,0.4\n", r"\[2, 3\]"),  # pandas took the categories as an index: shifted
    ("biology,0.9,0.4,0.5\nlaw,0.7,0.6\n", r"\[2\]"),
    ("biology,0.9,0.4\nlaw,0.7,0.6,\n", r"\[3\]"),
    ("biology,0.9,0.4\nscience, technology,0.7,0.6\n", r"\[3\]"),  # an unquoted comma in a category
])
def test_scores_csv_rows_with_more_fields_than_the_header_are_refused(tmp_path, rows, lines):
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.groundtruth.table import read_scores_csv

    path = tmp_path / "truth.csv"
    path.write_text("category,before,after\n" + rows)
    with pytest.raises(ConfigError, match=r"truth\.csv: line\(s\) " + lines + r" have more fields than the header "
                                          r"\(3: category, before, after\).*quote"):
        read_scores_csv(path)
    path.write_text('category,before,after\n"science, technology",0.7,0.6\n')  # quoted: one field
    assert read_scores_csv(path)["category"].tolist() == ["science, technology"]


def test_scores_csv_categories_are_stripped(tmp_path):
    from mneme_plugin.groundtruth.table import read_scores_csv

    path = tmp_path / "truth.csv"
    path.write_text("category,before,after\n biology ,0.9,0.4\n")
    assert read_scores_csv(path)["category"].tolist() == ["biology"]


@pytest.mark.parametrize("data, expected", [
    ({"results": {"mmlu_law": {"acc,none": "N/A"}}}, r"task 'mmlu_law' has acc,none = 'N/A', not a finite number"),
    ({"results": {"mmlu_law": {"acc,none": None}}}, r"task 'mmlu_law' has acc,none = None"),
    ({"results": {"mmlu_law": {"acc,none": 0.5}}, "n-samples": [1]}, r"'n-samples' is a list"),
    ({"results": {"mmlu_other": {"acc,none": 0.5}, "mmlu_pro_other": {"acc,none": 0.4}}},
     r"tasks \['mmlu_other', 'mmlu_pro_other'\] map to one category"),
])
def test_malformed_lm_eval_results_name_the_file(tmp_path, data, expected):
    from mneme_plugin.errors import ConfigError

    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"results\.json: " + expected):
        read_lm_eval_results(path)
    with pytest.raises(ConfigError, match=r"results\.json: " + expected):  # `mneme evaluate --lm-eval-before/after`
        scores_from_lm_eval(path, path)


def test_an_lm_eval_file_that_is_not_a_results_mapping_is_refused(tmp_path):
    from mneme_plugin.errors import ConfigError

    path = tmp_path / "results.json"
    path.write_text("[]")
    with pytest.raises(ConfigError, match=r"results\.json has no 'results' mapping"):
        scores_from_lm_eval(path, path)
