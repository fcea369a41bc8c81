"""Per-latent decoder statistics: norms per model, relative norm Delta, cosine of the two rows."""

from __future__ import annotations

import torch


def relative_norm(norm_base: torch.Tensor, norm_edited: torch.Tensor) -> torch.Tensor:
    """Delta = ((n_b - n_f) / max(n_b, n_f) + 1) / 2: 1 base-only, 0.5 shared, 0 edited-only.

    NaN where both norms are zero.
    """
    largest = torch.maximum(norm_base, norm_edited)
    delta = ((norm_base - norm_edited) / largest + 1) / 2
    return torch.where(largest > 0, delta, torch.full_like(delta, float("nan")))


def decoder_stats(W_dec: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norms, Delta and cosine per latent from a decoder (2, m, d) [0 base, 1 edited] (float64).

    The decoder is taken as stored, i.e. in the crosscoder's normalised activation space.
    Cosine is NaN where either row is zero.
    """
    if W_dec.ndim != 3 or W_dec.shape[0] != 2:
        raise ValueError(f"Expected a decoder of shape (2, m, d), got {tuple(W_dec.shape)}.")
    W = W_dec.detach().to(torch.float64)
    norms = W.norm(dim=-1)  # (2, m)
    n_b, n_f = norms[0], norms[1]
    dot = (W[0] * W[1]).sum(-1)
    denom = n_b * n_f
    cosine = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(dot, float("nan")))
    return {
        "norm_base": n_b,
        "norm_edited": n_f,
        "delta": relative_norm(n_b, n_f),
        "cosine": cosine,
    }
