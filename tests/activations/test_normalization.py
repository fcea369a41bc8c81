"""Norm statistics: the median over every row, the mean and the sqrt(d) scale over the rows that are kept."""

import math

import numpy as np
import pytest
import torch

from mneme_plugin.activations.normalization import estimate_stats, outlier_keep_mask


def _planted_norms():
    """201 (base, edited) norm pairs around 5 and 10, with massive-activation rows planted in one model each."""
    gen = torch.Generator().manual_seed(0)
    norms = torch.stack([4 + 2 * torch.rand(201, generator=gen), 9 + 2 * torch.rand(201, generator=gen)], dim=1)
    planted = {10: (1, 1e4), 50: (1, 2e4), 150: (1, 5e3), 70: (0, 5e3)}  # row: (model, norm)
    for row, (model, value) in planted.items():
        norms[row, model] = value
    return norms, sorted(planted)


def test_scale_fits_the_rows_kept_after_the_outlier_filter():
    norms, planted = _planted_norms()
    d = 64
    stats = estimate_stats(norms, d, outlier_factor=50.0)
    values = norms.double().numpy()
    kept = [i for i in range(len(values)) if i not in planted]
    assert stats.median_norms == pytest.approx(np.median(values, axis=0).tolist(), rel=1e-6)  # odd count: one middle
    assert stats.mean_norms == pytest.approx(values[kept].mean(axis=0).tolist(), rel=1e-6)
    assert stats.scale_factors == pytest.approx((math.sqrt(d) / values[kept].mean(axis=0)).tolist(), rel=1e-6)
    assert stats.n_tokens == 201
    # A row goes when either model's norm is beyond factor x that model's median: the planted rows exactly.
    mask = outlier_keep_mask(norms, torch.tensor(stats.median_norms), 50.0)
    assert torch.nonzero(~mask).flatten().tolist() == planted
    # Without a filter every row counts, the planted ones included.
    unfiltered = estimate_stats(norms, d, outlier_factor=None)
    assert unfiltered.mean_norms == pytest.approx(values.mean(axis=0).tolist(), rel=1e-6)
    assert outlier_keep_mask(norms, torch.tensor(stats.median_norms), None).all()
