"""The outlier_or_broad rule (and outlier_plus_broad): its two tests against exact definitions, its calibration under the null
(a control-sized change spread evenly predicts nothing), and planted concentrated / broad / absent
changes, each answered as the rule promises."""

from fractions import Fraction
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from mneme_plugin.sideeffects import PredictConfig, predict
from mneme_plugin.sideeffects.shift import broad_change_pvalue, changed_share, homogeneity_pvalue

CATEGORIES = [f"c{i}" for i in range(8)]


def _exact_homogeneity(categories, changed):
    """Exact permutation p-value: every placement of the changed latents, chi-square statistic >= observed."""
    cats = np.asarray(categories)
    groups = sorted(set(categories))
    n, k = len(cats), int(sum(changed))
    share = k / n

    def stat(chosen):
        flags = np.zeros(n, bool)
        flags[list(chosen)] = True
        out = 0.0
        for g in groups:
            size = (cats == g).sum()
            observed, expected = flags[cats == g].sum(), size * share
            out += (observed - expected) ** 2 / expected + (observed - expected) ** 2 / (size - expected)
        return out

    observed = stat(np.flatnonzero(changed))
    draws = [stat(c) for c in combinations(range(n), k)]
    return Fraction(sum(d >= observed - 1e-9 for d in draws), len(draws))


@pytest.mark.parametrize("changed", [
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
    [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1],
])
def test_homogeneity_pvalue_converges_to_the_exact_permutation_pvalue(changed):
    categories = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    exact = float(_exact_homogeneity(categories, changed))
    estimate = homogeneity_pvalue(categories, [bool(c) for c in changed], permutations=20_000, seed=1)
    assert estimate == pytest.approx(exact, abs=0.012)


@pytest.mark.parametrize("permutations", [1, 7, 50])
def test_homogeneity_pvalue_counts_the_observed_table_among_the_permutations(permutations):
    # p = (1 + #{permuted stat >= observed}) / (1 + permutations): a multiple of 1 / (1 + permutations),
    # never 0, even for the most extreme table (every changed latent in one category).
    categories = ["a"] * 6 + ["b"] * 6 + ["c"] * 6
    for changed in ([1] * 6 + [0] * 12, [1, 0] * 9, [1, 1, 0, 0, 0, 0] * 3):
        for seed in range(5):
            p = homogeneity_pvalue(categories, [bool(c) for c in changed], permutations=permutations, seed=seed)
            scaled = p * (1 + permutations)
            assert 1 <= round(scaled) <= 1 + permutations and scaled == pytest.approx(round(scaled), abs=1e-9)


def test_homogeneity_pvalue_has_nothing_to_test_without_variation():
    assert homogeneity_pvalue(["a", "b", "a"], [False, False, False]) == 1.0
    assert homogeneity_pvalue(["a", "b", "a"], [True, True, True]) == 1.0
    assert homogeneity_pvalue(["a", "a", "a"], [True, False, True]) == 1.0
    with pytest.raises(ValueError, match="same length"):
        homogeneity_pvalue(["a"], [True, False])


def test_broad_change_pvalue_is_fishers_one_sided_exact_test():
    # Brute force: all ways to split the changed latents of both crosscoders between them.
    changed, live, control_changed, control_live = 5, 9, 2, 8
    total, successes = live + control_live, changed + control_changed
    items = range(total)
    draws = list(combinations(items, live))
    at_least = sum(1 for d in draws if sum(1 for i in d if i < successes) >= changed)
    assert broad_change_pvalue(changed, live, control_changed, control_live) == pytest.approx(at_least / len(draws))
    assert broad_change_pvalue(0, 10, 5, 10) == 1.0
    with pytest.raises(ValueError, match="cannot exceed"):
        broad_change_pvalue(11, 10, 1, 10)


def _table(rng, n_live, change_prob):
    """An attribution table and links: each live latent in one category, changed with its category's probability."""
    cats = rng.choice(CATEGORIES, size=n_live)
    changed = rng.random(n_live) < np.array([change_prob[c] for c in cats])
    cls = np.where(changed, np.where(rng.random(n_live) < 0.5, "suppressed", "amplified"), "shared")
    attribution = pd.DataFrame({"latent": np.arange(n_live), "latent_class": cls,
                                "score": np.where(changed, rng.uniform(0.1, 1.0, n_live), 0.0)})
    links = pd.DataFrame({"latent": np.arange(n_live), "category": cats, "similarity": 0.5})
    return attribution, links


def _control(rng, n_live=256, rate=0.1):
    return _table(rng, n_live, dict.fromkeys(CATEGORIES, rate))[0]


def _predict(attribution, links, control, **overrides):
    cfg = PredictConfig(**({"rule": "outlier_or_broad", "max_latents": None} | overrides))
    return predict(attribution, links, CATEGORIES, cfg, reference=links["latent"].tolist(), control=control)


def test_a_control_sized_even_change_predicts_nothing_most_of_the_time():
    rng = np.random.default_rng(0)
    trials, predicted_any = 60, 0
    for _ in range(trials):
        attribution, links = _table(rng, 256, dict.fromkeys(CATEGORIES, 0.1))
        prediction = _predict(attribution, links, _control(rng), permutations=500)
        predicted_any += bool(prediction.predicted)
    # Both tests at alpha = 0.05 under their nulls (a union of two tests: at most ~0.1), with slack.
    assert predicted_any / trials <= 0.15


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_concentrated_change_predicts_its_categories(seed):
    rng = np.random.default_rng(seed)
    attribution, links = _table(rng, 400, dict.fromkeys(CATEGORIES, 0.05) | {"c3": 0.7})
    prediction = _predict(attribution, links, _control(rng))
    assert prediction.predicted == ["c3"]
    assert prediction.tests["verdict"] == "concentrated"


def test_a_permutation_p_value_equal_to_alpha_rejects():
    # With 199 permutations, a change that no permutation matches has p = (1 + 0) / (1 + 199) = 0.005:
    # at alpha = 0.005 it is concentrated (every test of the rules rejects at p <= alpha).
    rng = np.random.default_rng(1)
    attribution, links = _table(rng, 400, dict.fromkeys(CATEGORIES, 0.05) | {"c3": 0.7})
    prediction = _predict(attribution, links, _control(rng), permutations=199, alpha=0.005)
    assert prediction.tests["concentration_p"] == 0.005
    assert prediction.tests["verdict"] == "concentrated" and prediction.predicted == ["c3"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_broad_even_change_predicts_every_category(seed):
    rng = np.random.default_rng(seed)
    attribution, links = _table(rng, 400, dict.fromkeys(CATEGORIES, 0.35))
    prediction = _predict(attribution, links, _control(rng))
    assert sorted(prediction.predicted) == CATEGORIES
    assert prediction.tests["verdict"] == "broad"
    assert prediction.tests["breadth_p"] < 0.05 <= prediction.tests["concentration_p"]


def test_without_a_control_the_rule_is_the_outlier_rule():
    rng = np.random.default_rng(4)
    for change in (dict.fromkeys(CATEGORIES, 0.35), dict.fromkeys(CATEGORIES, 0.05) | {"c5": 0.6}):
        attribution, links = _table(rng, 400, change)
        prediction = _predict(attribution, links, None)
        outlier = predict(attribution, links, CATEGORIES, PredictConfig(rule="outlier", max_latents=None))
        assert prediction.predicted == outlier.predicted
        assert prediction.tests == {"verdict": "no control: the outlier rule"}


@pytest.mark.parametrize("seed", [7, 8])
def test_a_broad_change_spares_the_categories_it_does_not_reach(seed):
    # Narrow fine-tuning overwrites most subjects and spares its own: the shares differ (concentration
    # rejected) but no category stands out upwards, so the change is broad and the spared one is left out.
    rng = np.random.default_rng(seed)
    attribution, links = _table(rng, 800, dict.fromkeys(CATEGORIES, 0.4) | {"c0": 0.1})
    prediction = _predict(attribution, links, _control(rng, n_live=800))
    assert prediction.tests["verdict"] == "broad"
    assert prediction.tests["concentration_p"] < 0.05
    assert sorted(prediction.predicted) == CATEGORIES[1:]


# RMU of one subject that also costs its neighbours a little: one category far above the others, one
# clearly above the control's rate but inside the noise floor's spread, the rest at or below it.
NEIGHBOURED = {"c0": 0.02, "c1": 0.15, "c2": 0.05, "c3": 0.8, "c4": 0.10, "c5": 0.3, "c6": 0.2, "c7": 0.08}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_outlier_plus_broad_adds_the_categories_changed_beyond_the_control(seed):
    rng = np.random.default_rng(seed)
    attribution, links = _table(rng, 800, NEIGHBOURED)
    control = _control(rng, n_live=800)
    concentrated = _predict(attribution, links, control)
    plus = _predict(attribution, links, control, rule="outlier_plus_broad")
    assert concentrated.tests["verdict"] == "concentrated" and concentrated.predicted == ["c3"]
    assert plus.tests["verdict"] == "concentrated and broad"
    assert plus.tests["concentration_p"] < 0.05 and plus.tests["breadth_p"] < 0.05
    # Exactly the outliers plus the per-category test's categories, which hold the neighbour and
    # none of the categories changed less than the control.
    named_by_test = {c for c, q in plus.tests["broad_q"].items() if q < 0.05}
    assert set(plus.predicted) == {"c3"} | named_by_test
    assert "c5" in plus.predicted
    assert not {"c0", "c2", "c7"} & set(plus.predicted)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_outlier_plus_broad_is_the_outlier_answer_when_the_edit_is_no_broader_than_the_control(seed):
    rng = np.random.default_rng(seed)
    attribution, links = _table(rng, 400, dict.fromkeys(CATEGORIES, 0.05) | {"c3": 0.7})
    control = _control(rng, rate=0.25)  # changes a larger share of latents than the edit
    plus = _predict(attribution, links, control, rule="outlier_plus_broad")
    assert plus.tests["breadth_p"] >= 0.05
    assert plus.predicted == ["c3"] and plus.tests["verdict"] == "concentrated"
    assert "broad_q" not in plus.tests


def test_changed_share_counts_live_latents_only():
    table = pd.DataFrame({"latent": range(5), "latent_class": ["dead", "suppressed", "shared", "amplified", "dead"]})
    assert changed_share(table, ("suppressed", "amplified")) == (2, 3)
