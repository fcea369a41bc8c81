"""The collect stage's uniform reference sample of live latents (the enrichment rule's null)."""

from __future__ import annotations

import numpy as np

from mneme_plugin.attribution.table import AttributionResult
from mneme_plugin.interpret.contexts import load_reference_latents, reference_sample
from tests.helpers import attribution_result


def _attribution(m: int = 48, dead: tuple[int, ...] = (1, 2, 9)) -> AttributionResult:
    classes = ["shared"] * m
    classes[4] = classes[5] = "suppressed"
    for latent in dead:
        classes[latent] = "dead"
    return attribution_result(classes)


def test_reference_sample_is_uniform_over_live_latents_and_seeded():
    attribution = _attribution()
    live = set(range(48)) - {1, 2, 9}
    sample = reference_sample(attribution, 10, seed=3)
    assert len(sample) == 10 and set(sample) <= live and sample == sorted(sample)
    assert reference_sample(attribution, 10, seed=3) == sample
    assert reference_sample(attribution, 1000) == sorted(live)
    assert reference_sample(attribution, 0) == []
    # Uniform: over many seeds every live latent is drawn about equally often, dead ones never.
    counts = np.zeros(48)
    for seed in range(600):
        counts[reference_sample(attribution, 9, seed=seed)] += 1
    expected = 600 * 9 / len(live)
    assert counts[[1, 2, 9]].sum() == 0
    assert np.all(np.abs(counts[sorted(live)] - expected) < 5 * np.sqrt(expected))


def test_collect_adds_the_reference_sample_and_records_it(tmp_path, ht_pair, thresholded_crosscoder, collect_corpus):
    from mneme_plugin.activations import HarvestConfig
    from mneme_plugin.interpret import CollectConfig, collect

    attribution = _attribution()
    cfg = CollectConfig(classes=["suppressed"], reference_latents=6, seed=1, n_top=3, n_random=2,
                        n_non_activating=2, example_ctx_len=16,
                        harvest=HarvestConfig(layer=1, context_length=32, batch_size=4))
    base, edited = ht_pair
    result = collect(base, edited, thresholded_crosscoder, collect_corpus, cfg, out_dir=tmp_path,
                     attribution=attribution, progress=False)
    reference = load_reference_latents(tmp_path)
    assert reference == reference_sample(attribution, 6, seed=1)
    assert set(result.latents) == {4, 5} | set(reference)
