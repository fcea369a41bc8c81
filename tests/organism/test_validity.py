"""The validity grid on three organisms (slow): cases run through the real pipeline, every rule scored
offline against the measured ground truth, and the summary's means agree with the per-case rows."""

import pytest

from mneme_plugin.organism.corpus import DOMAINS
from mneme_plugin.organism.validity import (
    case_evidence, grid_cases, run_grid_case, score_case, summarize, threshold_ceiling,
)
from mneme_plugin.sideeffects.config import PredictConfig

RULES = {"MNEME default": PredictConfig(), "MNEME outlier": PredictConfig(rule="outlier"),
         "MNEME enrichment": PredictConfig(rule="enrichment")}


def test_grid_cases_cover_targets_once_and_benign_once_per_seed():
    cases = grid_cases([0, 1], ["law", "biology"], ["rmu", "narrow", "benign"])
    assert len(cases) == 2 * (2 + 2 + 1)
    assert len({c.name for c in cases}) == len(cases)
    assert [c.target for c in cases if c.intervention == "benign"] == [None, None]
    behaviour = grid_cases([0, 1], ["law", "biology"], ["identity", "insecure"])
    assert [(c.seed, c.intervention, c.target) for c in behaviour] == [
        (0, "identity", None), (0, "insecure", None), (1, "identity", None), (1, "insecure", None)]


@pytest.mark.slow
def test_grid_on_three_organisms(tmp_path):
    import pandas as pd

    assert PredictConfig().rule == "outlier_or_broad"
    rows, dirs = [], {}
    for case in grid_cases([1], ["law"], ["rmu", "narrow", "benign"]):
        dirs[case.intervention] = (case, run_grid_case(case, tmp_path))
        rows.extend(score_case(case, dirs[case.intervention][1], RULES))
    assert (tmp_path / "seed1" / "control" / "run" / "attribution").is_dir()  # the default rule's control
    table = pd.DataFrame(rows)
    print(table[["case", "method", "accuracy", "precision", "f1", "predicted", "true"]].to_string())
    by_case = {name: group.set_index("method") for name, group in table.groupby("intervention")}
    rmu, narrow, benign = by_case["rmu"], by_case["narrow"], by_case["benign"]
    assert rmu.loc["oracle", "accuracy"] == 1.0 and rmu.loc["oracle", "n_true"] >= 1
    # RMU: when the default rule predicts, it is mostly right, and more precise than chance.
    assert rmu.loc["MNEME default", "n_predicted"] >= 1
    assert rmu.loc["MNEME default", "precision"] >= 0.5 > rmu.loc["random", "precision"]
    # Narrow fine-tuning degrades most domains: the default rule's breadth test finds at least half
    # of them, where the outlier rule, which looks for what stands out, finds fewer.
    assert narrow.loc["oracle", "n_true"] >= 4
    assert narrow.loc["MNEME default", "accuracy"] >= 0.5
    assert narrow.loc["MNEME default", "accuracy"] > narrow.loc["MNEME outlier", "accuracy"]
    # Benign fine-tuning: the calibrated rule raises no false alarm, the default at most one.
    fp = benign["n_predicted"] - benign["n_hit"]
    assert fp["MNEME enrichment"] == 0 and fp["MNEME default"] <= 1
    # The threshold ceiling's evidence is the stored prediction's, its truth the evaluation's.
    evidence, truth = case_evidence(*dirs["rmu"])
    assert truth == set(rmu.loc["oracle", "true"].split(",")) and set(evidence.index) == set(DOMAINS)
    assert set(evidence.index[evidence >= 3.0]) == set(filter(None, rmu.loc["MNEME outlier", "predicted"].split(",")))
    summary = summarize(table).set_index(["intervention", "method"])
    assert summary.loc[("rmu", "MNEME default"), "cases"] == 1
    assert summary.loc[("rmu", "MNEME default"), "predicted"] == rmu.loc["MNEME default", "n_predicted"]

    # Pooling over crosscoder seeds: every rule's three predictions, a category kept by 2 of 3 votes.
    from collections import Counter

    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret.contexts import load_reference_latents
    from mneme_plugin.interpret.mapping import category_links, load_mapping
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.organism.validity import run_extra_crosscoders
    from mneme_plugin.sideeffects.predict import predict

    case, case_dir = dirs["rmu"]
    runs = [case_dir / "run", *run_extra_crosscoders(case, tmp_path, 3)]
    pooled = {r["method"]: r for r in score_case(case, case_dir, RULES, n_crosscoders=3) if "pooled" in r["method"]}
    assert list(pooled) == [f"{name}, pooled over 3 crosscoders" for name in RULES]
    control = load_attribution(RunLayout(tmp_path / "seed1" / "control" / "run").attribution).table
    for name, rule in RULES.items():
        votes = Counter()
        for run in runs:
            layout = RunLayout(run)
            votes.update(predict(load_attribution(layout.attribution).table,
                                 category_links(load_mapping(layout.mapping), "organism"), list(DOMAINS), rule,
                                 reference=load_reference_latents(layout.contexts), control=control).predicted)
        by_hand = sorted(c for c, n in votes.items() if n >= 2)
        assert sorted(filter(None, pooled[f"{name}, pooled over 3 crosscoders"]["predicted"].split(","))) == by_hand


def test_remediation_summary_is_the_mean_of_per_case_means(tmp_path):
    import pandas as pd

    from mneme_plugin.organism.validity import GridCase, remediation_rows, summarize_remediation
    from mneme_plugin.sideeffects.remediate import ControlledRemediation, save_controlled_remediation

    rows = []
    for seed, (rem, ctl) in enumerate([((1.0, 0.5), (0.5, 0.5)), ((0.2,), (0.6,))]):
        degraded = ["law", "history"][: len(rem)]
        base = dict.fromkeys(degraded, 1.0)
        edited = dict.fromkeys(degraded, 0.0)
        result = ControlledRemediation(base=base, edited=edited, remediated=dict(zip(degraded, rem)),
                                       control=dict(zip(degraded, ctl)), degraded=degraded, n_samples=4, steps=2)
        case = GridCase(seed, "rmu", "law")
        save_controlled_remediation(result, tmp_path / case.name)
        rows.extend(remediation_rows(case, tmp_path / case.name))
    assert remediation_rows(GridCase(9, "rmu", "law"), tmp_path / "missing") == []
    summary = summarize_remediation(pd.DataFrame(rows)).set_index("intervention")
    # Case means: remediation 0.75 and 0.2, control 0.5 and 0.6.
    assert summary.loc["rmu", "remediation"].startswith("0.47 ± 0.39")
    assert summary.loc["rmu", "control"].startswith("0.55 ± 0.07")
    assert summary.loc["rmu", "remediation ahead"] == "1 of 2"
    assert "all" not in summary.index  # one intervention: no pooled row
    # A second intervention adds a row over every case: case means 0.75, 0.2, 0.9 against 0.5, 0.6, 0.3.
    narrow = GridCase(0, "narrow", "law")
    save_controlled_remediation(ControlledRemediation(base={"law": 1.0}, edited={"law": 0.0}, remediated={"law": 0.9},
                                                      control={"law": 0.3}, degraded=["law"], n_samples=4, steps=2),
                                tmp_path / narrow.name)
    rows.extend(remediation_rows(narrow, tmp_path / narrow.name))
    summary = summarize_remediation(pd.DataFrame(rows)).set_index("intervention")
    assert list(summary.index) == ["rmu", "narrow", "all"]
    assert summary.loc["all", "cases"] == 3
    assert summary.loc["all", "remediation"].startswith("0.62 ± 0.37")
    assert summary.loc["all", "control"].startswith("0.47 ± 0.15")
    assert summary.loc["all", "remediation ahead"] == "2 of 3"


def test_cases_not_remediated_are_counted_apart_and_as_zero_in_the_all_cases_mean(tmp_path, caplog):
    import logging
    import math

    import pandas as pd

    from mneme_plugin.groundtruth.table import SCORES_CSV
    from mneme_plugin.organism.validity import GridCase, remediation_rows, summarize_remediation
    from mneme_plugin.sideeffects.remediate import ControlledRemediation, save_controlled_remediation

    done = GridCase(0, "rmu", "law")
    save_controlled_remediation(ControlledRemediation(base={"law": 1.0}, edited={"law": 0.0}, remediated={"law": 0.8},
                                                      control={"law": 0.4}, degraded=["law"], n_samples=4, steps=2),
                                tmp_path / done.name)
    # A benign case whose prediction named nothing: degraded in its ground truth (law 1.0 -> 0.5), no record.
    skipped = GridCase(1, "benign", None)
    (tmp_path / skipped.name).mkdir(parents=True)
    pd.DataFrame({"category": ["law", "cooking"], "before": [1.0, 1.0], "after": [0.5, 0.97],
                  "n": [32, 32]}).to_csv(tmp_path / skipped.name / SCORES_CSV, index=False)
    rows = remediation_rows(done, tmp_path / done.name) + remediation_rows(skipped, tmp_path / skipped.name)
    assert [(r["case"], r["category"], r["remediated"]) for r in rows] == [
        (done.name, "law", True), (skipped.name, "law", False)]
    assert math.isnan(rows[1]["recovered_remediated"])
    assert remediation_rows(GridCase(2, "identity", None), tmp_path / skipped.name) == []  # no remediation step
    # A case whose prediction named a domain but that has no record was stopped during its remediation:
    # it is left out (with a warning), not counted as a case with nothing to remediate.
    from mneme_plugin.sideeffects.predict import Prediction, save_prediction

    stopped = GridCase(3, "rmu", "law")
    (tmp_path / stopped.name).mkdir(parents=True)
    (tmp_path / skipped.name / SCORES_CSV).rename(tmp_path / stopped.name / SCORES_CSV)
    save_prediction(Prediction(pd.DataFrame({"category": ["law"], "score": [1.0], "predicted": [True]}), ["law"]),
                    tmp_path / stopped.name / "run" / "prediction")
    with caplog.at_level(logging.WARNING):
        assert remediation_rows(stopped, tmp_path / stopped.name) == []
    assert "no remediation record" in caplog.text
    summary = summarize_remediation(pd.DataFrame(rows)).set_index("intervention")
    assert summary.loc["all", "cases"] == 2 and summary.loc["all", "remediated"] == 1
    assert summary.loc["all", "remediation"].startswith("0.80") and summary.loc["all", "control"].startswith("0.40")
    assert summary.loc["all", "remediation ahead"] == "1 of 1"
    assert summary.loc["all", "all cases (not remediated = 0)"] == "0.40 vs 0.20"
    assert summary.loc["benign", "remediation"] == "n/a" and summary.loc["benign", "remediated"] == 0


def test_remediation_rows_with_significance_keep_only_significant_drops(tmp_path):
    import pandas as pd

    from mneme_plugin.groundtruth.table import SCORES_CSV
    from mneme_plugin.organism.validity import GridCase, remediation_rows
    from mneme_plugin.sideeffects.remediate import ControlledRemediation, save_controlled_remediation

    case = GridCase(0, "benign", None)
    case_dir = tmp_path / case.name
    # law: 32 -> 20 of 32 right (Fisher p < 0.001); cooking: 32 -> 28 (p 0.057), over 0.1 but within chance.
    base, edited = {"law": 1.0, "cooking": 1.0}, {"law": 20 / 32, "cooking": 28 / 32}
    save_controlled_remediation(ControlledRemediation(base=base, edited=edited, remediated=dict(base),
                                                      control=dict(edited), degraded=["law", "cooking"],
                                                      n_samples=4, steps=2), case_dir)
    pd.DataFrame({"category": ["law", "cooking"], "before": [1.0, 1.0], "after": [20 / 32, 28 / 32],
                  "n": [32, 32]}).to_csv(case_dir / SCORES_CSV, index=False)
    assert [r["category"] for r in remediation_rows(case, case_dir)] == ["law", "cooking"]
    significant = remediation_rows(case, case_dir, significance=0.05)
    assert [r["category"] for r in significant] == ["law"]
    assert significant[0]["recovered_remediated"] == 1.0 and significant[0]["recovered_control"] == 0.0
    assert remediation_rows(case, case_dir, significance=0.1) == remediation_rows(case, case_dir)  # p 0.057 < 0.1


def test_threshold_ceiling_is_the_best_threshold_of_a_dense_sweep():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    categories = [f"c{i}" for i in range(8)]
    cases = []
    for _ in range(12):
        truth = set(rng.choice(categories, size=int(rng.integers(0, 4)), replace=False))
        # Evidence: higher on degraded categories on average, with overlap; some categories have none.
        z = pd.Series([rng.normal(2.0 if c in truth else 0.0) for c in categories], index=categories)
        cases.append((z.where(rng.uniform(size=8) > 0.2), truth))
    best = threshold_ceiling(cases, min_precision=0.6)

    def metrics(threshold):
        acc = [len(set(z.index[z >= threshold]) & t) / len(t) for z, t in cases if t]
        prec = [len(set(z.index[z >= threshold]) & t) / (z >= threshold).sum() for z, t in cases if (z >= threshold).any()]
        return np.mean(acc), np.mean(prec) if prec else np.nan

    sweep = [(threshold, *metrics(threshold)) for threshold in np.linspace(-4, 6, 4001)]
    feasible = [(a, p) for _, a, p in sweep if p >= 0.6]
    assert best["accuracy"] == pytest.approx(max(a for a, _ in feasible))
    assert best["precision"] >= 0.6
    assert metrics(best["threshold"]) == pytest.approx((best["accuracy"], best["precision"]))
    # Nothing keeps a precision above 1: no threshold.
    assert np.isnan(threshold_ceiling(cases, min_precision=1.01)["accuracy"])
