"""Classification thresholds, the score, dead latents and config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mneme_plugin.attribution import AttributionConfig, classify, decoder_stats, relative_norm
from mneme_plugin.errors import ConfigError


def _columns(delta, nu_e=0.0, nu_r=0.0, nu_e_mirror=0.0, nu_r_mirror=0.0, fire_count=10):
    n = len(delta)
    full = lambda v: np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy()  # noqa: E731
    return {
        "delta": np.asarray(delta, dtype=float), "fire_count": np.broadcast_to(fire_count, (n,)).copy(),
        "nu_e": full(nu_e), "nu_r": full(nu_r), "nu_e_mirror": full(nu_e_mirror), "nu_r_mirror": full(nu_r_mirror),
    }


def test_delta_thresholds_are_respected():
    delta = [0.0, 0.0999, 0.1, 0.399, 0.401, 0.5, 0.599, 0.601, 0.9, 0.9001, 1.0]
    out = classify(_columns(delta), AttributionConfig(use_betas=False))
    assert list(out["latent_class"]) == [
        "edited_only", "edited_only", "amplified", "amplified", "shared", "shared", "shared",
        "suppressed", "suppressed", "base_only", "base_only",
    ]
    custom = AttributionConfig(delta_edited_only=0.2, delta_base_only=0.7, shared_band=0.05, use_betas=False)
    out = classify(_columns([0.15, 0.25, 0.46, 0.56, 0.65, 0.75]), custom)
    assert list(out["latent_class"]) == ["edited_only", "amplified", "shared", "suppressed", "suppressed", "base_only"]


def test_betas_confirm_or_demote_the_extremes():
    cfg = AttributionConfig()
    # Edited-only by norms: needs |nu_e| < 0.2 and |nu_r| < 0.5.
    out = classify(_columns([0.05] * 5, nu_e=[0.1, 0.19, 0.3, 0.1, -0.5], nu_r=[0.4, 0.49, 0.1, 0.6, 0.1]), cfg)
    assert list(out["latent_class"]) == ["edited_only", "edited_only", "amplified", "amplified", "amplified"]
    assert list(out["betas_confirm"]) == [True, True, False, False, False]
    # Base-only by norms: the mirrored ratios (base row as latent vector), same thresholds.
    cols = _columns([0.95] * 4, nu_e_mirror=[0.1, 0.3, 0.1, np.nan], nu_r_mirror=[0.4, 0.1, 0.7, np.nan])
    out = classify(cols, cfg)
    assert list(out["latent_class"]) == ["base_only", "suppressed", "suppressed", "base_only"]  # NaN: Delta decides
    assert list(out["betas_confirm"]) == [True, False, False, None]
    # The "edited" variant: 1 / nu with the edited row.
    cols = _columns([0.95] * 3, nu_e=[10.0, 2.0, 10.0], nu_r=[5.0, 5.0, 1.5])
    out = classify(cols, AttributionConfig(base_specific_vector="edited"))
    assert list(out["latent_class"]) == ["base_only", "suppressed", "suppressed"]
    # Not extremes: betas play no part in the class.
    out = classify(_columns([0.3, 0.5, 0.7], nu_e=9.0, nu_r=9.0, nu_e_mirror=9.0, nu_r_mirror=9.0), cfg)
    assert list(out["latent_class"]) == ["amplified", "shared", "suppressed"]
    assert list(out["betas_confirm"]) == [None, None, None]


def test_score_ranks_base_specific_first_and_dead_last():
    cols = _columns([0.95, 0.99, 0.7, 0.5, 0.05, 0.99], nu_e=0.05, nu_e_mirror=[0.1, 0.0, 0.0, 0.0, 0.0, 0.9],
                    fire_count=[5, 5, 5, 5, 5, 0])
    out = classify(cols)
    score = out["score"]
    assert score[1] == pytest.approx(0.98) and score[0] == pytest.approx(0.9 * 0.9)
    assert score[2] == pytest.approx(0.4) and score[3] == 0.0
    assert score[4] == pytest.approx(-0.9 * 0.95)
    assert np.isnan(score[5]) and out["latent_class"][5] == "dead"
    assert list(out["rank"]) == [2, 1, 3, 4, 5, 6]


def test_score_confidence_takes_the_ratios_magnitude():
    # c = 1 - min(1, |nu|): a negative error ratio (the other model carries the direction with the opposite
    # sign) lowers the confidence as much as a positive one of the same size, and the score stays in [-1, 1].
    cols = _columns([0.05, 0.05, 0.95, 0.95, 0.3], nu_e=[-0.5, 0.5, 0.0, 0.0, -3.0],
                    nu_e_mirror=[0.0, 0.0, -0.25, 0.25, 0.0])
    score = classify(cols)["score"]
    # By hand: (2 Delta - 1) * c = -0.9 * 0.5, -0.9 * 0.5, 0.9 * 0.75, 0.9 * 0.75, -0.4 * 0.
    np.testing.assert_allclose(score, [-0.45, -0.45, 0.675, 0.675, 0.0], atol=1e-12)
    rng = np.random.default_rng(0)
    n = 200
    wild = _columns(rng.uniform(0, 1, n), nu_e=rng.normal(0, 3, n), nu_r=rng.normal(0, 3, n),
                    nu_e_mirror=rng.normal(0, 3, n), nu_r_mirror=rng.normal(0, 3, n))
    assert np.all(np.abs(classify(wild)["score"]) <= 1.0)


def test_decoder_stats_and_relative_norm():
    W = torch.zeros(2, 4, 3, dtype=torch.float64)
    W[0, 0] = torch.tensor([1.0, 0, 0]); W[1, 0] = torch.tensor([0.5, 0, 0])  # base 2x longer
    W[0, 1] = torch.tensor([0, 1.0, 0]); W[1, 1] = torch.tensor([0, 0, 1.0])  # equal, orthogonal
    W[1, 2] = torch.tensor([0, 2.0, 0])  # edited only
    stats = decoder_stats(W)
    assert stats["delta"][0].item() == pytest.approx(0.75)
    assert stats["delta"][1].item() == 0.5 and stats["cosine"][1].item() == 0.0
    assert stats["delta"][2].item() == 0.0 and np.isnan(stats["cosine"][2].item())
    assert np.isnan(stats["delta"][3].item())  # both rows zero
    assert stats["cosine"][0].item() == pytest.approx(1.0)
    assert relative_norm(torch.tensor([3.0]), torch.tensor([0.0])).item() == 1.0


def test_latents_on_the_band_edges_take_the_documented_class():
    """Decoder norms (1, 0.8) give Delta 0.6 up to rounding (abs(0.6 - 0.5) is 0.0999... in floating point),
    which was classed shared; the docstring puts 0.6 in suppressed, 0.4 in amplified, 0.9 in suppressed and
    0.1 in amplified (edges inclusive). The summary's demotion counts read the same bands."""
    import pandas as pd

    from mneme_plugin.attribution.attribute import summarize

    norms = [(1.0, 0.8), (0.8, 1.0), (1.0, 0.2), (0.2, 1.0), (1.0, 0.79), (0.79, 1.0), (1.0, 0.19), (0.19, 1.0)]
    W = torch.zeros(2, len(norms), 3, dtype=torch.float64)
    for j, (n_b, n_f) in enumerate(norms):
        W[0, j, 0], W[1, j, 1] = n_b, n_f
    delta = decoder_stats(W)["delta"].numpy()
    np.testing.assert_allclose(delta[:4], [0.6, 0.4, 0.9, 0.1], atol=1e-15)
    expected = ["suppressed", "amplified", "suppressed", "amplified", "suppressed", "amplified", "base_only", "edited_only"]
    config = AttributionConfig(use_betas=False)
    assert list(classify(_columns(delta), config)["latent_class"]) == expected
    # Betas that would demote the extremes: on the edges there is no extreme to demote (nor to count).
    columns = _columns(delta, nu_e=5.0, nu_r=5.0, nu_e_mirror=5.0, nu_r_mirror=5.0)
    out = classify(columns, AttributionConfig())
    assert list(out["latent_class"]) == expected[:6] + ["suppressed", "amplified"]
    table = pd.DataFrame({**columns, **out})
    table["betas_confirm"] = pd.array(list(table["betas_confirm"]), dtype="boolean")
    summary = summarize(table, AttributionConfig(), 100, {})
    assert summary["demoted_by_betas"] == {"base_only": 1, "edited_only": 1}


@pytest.mark.parametrize(
    "changes",
    [{"delta_base_only": 0.55}, {"delta_edited_only": 0.45}, {"shared_band": 0.0}, {"nu_error_max": 0},
     {"base_specific_vector": "chat"}, {"batch_size": 0}],
)
def test_bad_config_is_refused(changes):
    with pytest.raises(ConfigError):
        AttributionConfig(**changes)
    with pytest.raises(ConfigError, match="did you mean"):
        AttributionConfig.from_dict({"delta_base_onl": 0.9})
