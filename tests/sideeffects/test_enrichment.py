"""The enrichment rule's statistics against brute-force definitions, and its calibration on planted
latent populations (nothing predicted under the null; the planted categories, few or many, found)."""

import math
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
