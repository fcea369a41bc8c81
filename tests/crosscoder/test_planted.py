"""Planted crosscoder data: the true codes returned with a sample rebuild it."""

import torch

from mneme_plugin.crosscoder.planted import PlantedData, PlantedSpec


def test_sample_with_codes_rebuilds_the_sample_and_matches_sample():
    spec = PlantedSpec(counts={"shared": 6, "amplified": 2, "suppressed": 2, "base_only": 3, "edited_only": 3},
                       p_active=0.2, noise=0.0, model_scales=(1.0, 3.0))
    data = PlantedData(spec)
    x, codes = data.sample_with_codes(500, torch.Generator().manual_seed(1))
    assert codes.shape == (500, spec.n_features) and (codes[codes > 0] >= spec.strength_range[0]).all()
    # Without noise a row is exactly its codes times the directions, each model at its scale.
    rebuilt = torch.stack([codes @ (data.directions[:, m] * spec.model_scales[m]) for m in range(2)], dim=1)
    torch.testing.assert_close(x, rebuilt)
    torch.testing.assert_close(torch.einsum("bn,nld->bld", codes, data.scaled_directions()), x)
    # Same generator state, same rows as sample().
    torch.testing.assert_close(data.sample(500, torch.Generator().manual_seed(1)), x)
    # Base-only features never reach the edited model, edited-only never the base one.
    kinds = data.kinds
    assert all(data.directions[i, 1].abs().sum() == 0 for i, k in enumerate(kinds) if k == "base_only")
    assert all(data.directions[i, 0].abs().sum() == 0 for i, k in enumerate(kinds) if k == "edited_only")
