"""The enrichment rule's statistics against brute-force definitions, and its calibration on planted
latent populations (nothing predicted under the null; the planted categories, few or many, found)."""

from fractions import Fraction
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from mneme_plugin.sideeffects import PredictConfig, predict
from mneme_plugin.sideeffects.enrichment import benjamini_hochberg, enrichment_table

CATEGORIES = [f"c{i}" for i in range(8)]
SHARES = np.array([0.3, 0.2, 0.1, 0.1, 0.1, 0.08, 0.07, 0.05])


def test_benjamini_hochberg_matches_its_definition():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=17) ** 2
    m = len(p)
    order = np.argsort(p)
    rank = {int(i): r + 1 for r, i in enumerate(order)}
    brute = [min(1.0, min(p[j] * m / rank[j] for j in range(m) if p[j] >= p[i])) for i in range(m)]
    assert np.allclose(benjamini_hochberg(p), brute)


def _exact_tail(population, members, side):
    """P(a uniformly drawn set of len(side) latents of the population holds at least as many members as the
    side does), by enumerating every such set."""
    k = len(members & side)
    draws = list(combinations(sorted(population), len(side)))
    return Fraction(sum(len(members & set(d)) >= k for d in draws), len(draws))


def test_enrichment_table_equals_exact_enumeration():
    # Latents 0-13 linked (latent 3 to two categories), 14-15 unlinked; the reference sample leaves out
    # some linked latents, and a changed latent outside it joins the population of its side.
    links = pd.DataFrame({
        "latent": [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
        "category": ["a", "a", "a", "a", "b", "b", "b", "b", "c", "c", "c", "c", "a", "b", "c"],
        "similarity": 0.5,
    })
    reference = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 14, 15]
    changed = {"suppressed": [0, 1, 3, 12, 15], "amplified": [5, 6, 13]}
    table = enrichment_table(links, changed, reference, ["a", "b", "c", "d"]).set_index("category")
    linked = set(links["latent"])
    members = {c: set(links.loc[links["category"] == c, "latent"]) for c in ["a", "b", "c", "d"]}
    p_values = []
    for side, latents in changed.items():
        side_set = set(latents) & linked
        population = (set(reference) & linked) | side_set
        for category, group in members.items():
            inside = group & population
            k = len(inside & side_set)
            assert table.loc[category, f"n_{side}"] == k, (side, category)
            assert table.loc[category, f"expected_{side}"] == pytest.approx(len(side_set) * len(inside) / len(population))
            exact = float(_exact_tail(population, inside, side_set)) if k else 1.0
            assert table.loc[category, f"p_{side}"] == pytest.approx(exact, rel=1e-9), (side, category)
            p_values.append((side, category, exact))
    # q: Benjamini-Hochberg over all (side, category) tests, from its definition.
    m = len(p_values)
    ordered = sorted(p for _, _, p in p_values)
    for side, category, p in p_values:
        q = min(1.0, min(ordered[j] * m / (j + 1) for j in range(m) if ordered[j] >= p))
        assert table.loc[category, f"q_{side}"] == pytest.approx(q, rel=1e-9), (side, category)
    # By hand: b's suppressed latents are 3 (also in a) and 12 (outside the reference); 15 has no link.
    assert table.loc["b", "n_suppressed"] == 2 and table.loc["a", "n_suppressed"] == 3
    assert table.loc["d", "n_suppressed"] == 0 and table.loc["d", "p_suppressed"] == 1.0


def _population(rng, n_live=600):
    """Live latents, each linked to one category drawn with SHARES (some categories are bigger)."""
    cats = rng.choice(len(CATEGORIES), size=n_live, p=SHARES)
    return pd.DataFrame({"latent": np.arange(n_live), "category": [CATEGORIES[c] for c in cats], "similarity": 0.5})


def _changed(rng, links, n, weights):
    """n changed latents drawn with per-category weights (uniform weights: the null)."""
    w = np.array([weights[c] for c in links["category"]], dtype=float)
    return rng.choice(links["latent"].to_numpy(), size=n, replace=False, p=w / w.sum()).tolist()


def test_under_the_null_almost_nothing_is_predicted():
    rng = np.random.default_rng(0)
    any_prediction = 0
    trials = 150
    for _ in range(trials):
        links = _population(rng)
        uniform = dict.fromkeys(CATEGORIES, 1.0)
        changed = {"suppressed": _changed(rng, links, 60, uniform), "amplified": _changed(rng, links, 40, uniform)}
        table = enrichment_table(links, changed, links["latent"].tolist(), CATEGORIES)
        any_prediction += bool((table[["q_suppressed", "q_amplified"]].min(axis=1) <= 0.05).any())
    # BH controls the family-wise error under the complete null at alpha (0.05); allow sampling slack.
    assert any_prediction / trials <= 0.1


def _attribution(changed_sup, changed_amp, n_live):
    cls = np.full(n_live, "shared", dtype=object)
    cls[changed_sup] = "suppressed"
    cls[changed_amp] = "amplified"
    return pd.DataFrame({"latent": np.arange(n_live), "latent_class": cls,
                         "score": np.where(cls == "shared", 0.0, 1.0)})


@pytest.mark.parametrize("seed", [1, 2])
def test_few_planted_categories_are_found_and_only_they(seed):
    rng = np.random.default_rng(seed)
    links = _population(rng)
    weights = dict.fromkeys(CATEGORIES, 1.0) | {"c2": 8.0, "c6": 8.0}
    sup = _changed(rng, links, 50, weights)
    attribution = _attribution(sup, [], len(links))
    prediction = predict(attribution, links, CATEGORIES, PredictConfig(rule="enrichment", max_latents=None),
                         reference=links["latent"].tolist())
    assert set(prediction.predicted) == {"c2", "c6"}


def test_broad_damage_predicts_many_categories():
    # The edit changes latents of six categories and spares two (the big c0 and c1): six predicted.
    rng = np.random.default_rng(4)
    links = _population(rng, n_live=1500)
    weights = dict.fromkeys(CATEGORIES, 1.0) | {"c0": 0.0, "c1": 0.0}
    sup = _changed(rng, links, 400, weights)
    attribution = _attribution(sup, [], len(links))
    prediction = predict(attribution, links, CATEGORIES, PredictConfig(rule="enrichment", max_latents=None),
                         reference=links["latent"].tolist())
    assert set(prediction.predicted) == set(CATEGORIES) - {"c0", "c1"}
    assert {"expected_suppressed", "p_suppressed", "q_suppressed"} <= set(prediction.scores.columns)


def test_a_uniform_reference_sample_gives_the_same_answer_as_all_live_latents():
    rng = np.random.default_rng(5)
    links = _population(rng, n_live=3000)
    weights = dict.fromkeys(CATEGORIES, 1.0) | {"c3": 6.0}
    sup = _changed(rng, links, 80, weights)
    sample = rng.choice(len(links), size=600, replace=False).tolist()
    mapped = links[links["latent"].isin(set(sample) | set(sup))]  # only collected latents are mapped
    attribution = _attribution(sup, [], len(links))
    cfg = PredictConfig(rule="enrichment", max_latents=None)
    assert predict(attribution, mapped, CATEGORIES, cfg, reference=sample).predicted == ["c3"]
    assert predict(attribution, links, CATEGORIES, cfg, reference=links["latent"].tolist()).predicted == ["c3"]
