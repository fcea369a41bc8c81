"""Per-model norm statistics: median (for outlier filtering) and the E||x|| = sqrt(d) scale.

The scale factors are recorded, never applied to stored data: the crosscoder applies them (and
saves them), so a store can be reused with other normalisations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class NormalizationStats:
    """Norm statistics of [base, edited] over the first ``n_tokens`` kept tokens."""

    median_norms: list[float]
    mean_norms: list[float]
    scale_factors: list[float]
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NormalizationStats":
        return cls(
            median_norms=[float(v) for v in data["median_norms"]],
            mean_norms=[float(v) for v in data["mean_norms"]],
            scale_factors=[float(v) for v in data["scale_factors"]],
            n_tokens=int(data["n_tokens"]),
        )


def token_norms(acts: torch.Tensor) -> torch.Tensor:
    """L2 norms (n, 2) of paired activations (n, 2, d), computed in float32."""
    return acts.float().norm(dim=-1)


def outlier_keep_mask(norms: torch.Tensor, median_norms: torch.Tensor, factor: float | None) -> torch.Tensor:
    """True for rows whose norm is <= factor x median in *both* models (all True if factor is None)."""
    if factor is None:
        return torch.ones(norms.shape[0], dtype=torch.bool, device=norms.device)
    limit = median_norms.to(norms.device, torch.float32) * float(factor)
    return (norms <= limit).all(dim=-1)


def estimate_stats(norms: torch.Tensor, d_model: int, outlier_factor: float | None) -> NormalizationStats:
    """Median norms of ``norms`` (n, 2); mean norms and scales over the non-outlier rows.

    The mean excludes outliers because they are never stored: the scale must fit the data the
    crosscoder actually sees.
    """
    norms = norms.float()
    median = norms.median(dim=0).values
    keep = outlier_keep_mask(norms, median, outlier_factor)
    mean = norms[keep].mean(dim=0) if keep.any() else norms.mean(dim=0)
    scale = math.sqrt(d_model) / mean.clamp_min(1e-12)
    return NormalizationStats(
        median_norms=median.tolist(),
        mean_norms=mean.tolist(),
        scale_factors=scale.tolist(),
        n_tokens=int(norms.shape[0]),
    )
