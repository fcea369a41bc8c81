"""Registry of reconstruction losses the BatchTopK trainer minimises (the aux-k loss is added to it).

Each function takes normalised activations and their reconstruction, both (B, num_models, d), and
returns a scalar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported by whoever calls these; the registry's names load without it
    import torch

LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """MNEME paper Eq. 1: squared error summed over both models, mean over rows."""
    return (x - x_hat).pow(2).sum(dim=(1, 2)).mean()


def norm_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """science-of-finetuning ``BatchTopKCrossCoderTrainer``: mean over (row, model) of ||x - x_hat||."""
    return (x - x_hat).norm(dim=-1).mean()


# The default's power of the error norm: between the fork's norm (1: least leak between the models'
# decoders) and the squared error (2: most variance explained, most leak); README "Crosscoder quality".
NORM_POWER = 1.25


def norm_power_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over (row, model) of ||x - x_hat||^NORM_POWER (the default, ``norm_1.25``)."""
    return (x - x_hat).norm(dim=-1).pow(NORM_POWER).mean()


RECONSTRUCTION_LOSSES: dict[str, LossFn] = {
    "squared": squared_error,
    "norm": norm_error,
    f"norm_{NORM_POWER}": norm_power_error,
}
