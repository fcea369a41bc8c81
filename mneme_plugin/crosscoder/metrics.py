"""Quality figures of a crosscoder: explained variance per model, MSE, L0, dead fraction."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from mneme_plugin.crosscoder.model import BatchTopKCrossCoder


@dataclass
class CrossCoderMetrics:
    """Reconstruction quality on a set of tokens (paper targets: <15% dead, >95% explained)."""

    explained_variance_base: float
    explained_variance_edited: float
    # Mean over tokens of the squared error summed over both models, in normalised units
    # (activations scaled so that E||x|| = sqrt(d)).
    mse: float
    l0: float
    dead_fraction: float
    # "training": dead for dead_after_tokens during training; "evaluation": never fired on these tokens.
    dead_fraction_source: str
    n_tokens: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@torch.no_grad()
def evaluate_crosscoder(
    crosscoder: BatchTopKCrossCoder,
    batches: Iterable[torch.Tensor],
    dead_mask: torch.Tensor | None = None,
) -> CrossCoderMetrics:
    """Evaluate with the inference encoding (threshold once estimated, else BatchTopK)."""
    device = crosscoder.W_enc.device
    n_models, d = crosscoder.cfg.num_models, crosscoder.activation_dim
    sum_x = torch.zeros(n_models, d, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros(n_models, dtype=torch.float64, device=device)
    sum_err = torch.zeros(n_models, dtype=torch.float64, device=device)
    fired = torch.zeros(crosscoder.dict_size, dtype=torch.bool, device=device)
    n_tokens, n_active = 0, 0
    for x in batches:
        x = x.to(device)
        f = crosscoder.encode(x)
        x_norm = crosscoder.normalize(x).double()
        x_hat_norm = crosscoder.normalize(crosscoder.decode(f)).double()
        sum_x += x_norm.sum(0)
        sum_x2 += x_norm.pow(2).sum(dim=(0, 2))
        sum_err += (x_norm - x_hat_norm).pow(2).sum(dim=(0, 2))
        active = f != 0
        fired |= active.any(0)
        n_active += int(active.sum())
        n_tokens += x.shape[0]
    if n_tokens == 0:
        raise ValueError("No tokens to evaluate the crosscoder on.")
    total_var = sum_x2 - sum_x.pow(2).sum(-1) / n_tokens
    explained = (1 - sum_err / total_var.clamp_min(1e-12)).tolist()
    if dead_mask is not None:
        dead_fraction, source = float(dead_mask.float().mean()), "training"
    else:
        dead_fraction, source = float((~fired).float().mean()), "evaluation"
    return CrossCoderMetrics(
        explained_variance_base=explained[0],
        explained_variance_edited=explained[1],
        mse=float(sum_err.sum() / n_tokens),
        l0=n_active / n_tokens,
        dead_fraction=dead_fraction,
        dead_fraction_source=source,
        n_tokens=n_tokens,
    )
