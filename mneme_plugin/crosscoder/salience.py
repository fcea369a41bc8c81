"""Registry of decoder-norm weights w_j used to rank latents in BatchTopK.

Each function takes the decoder (num_models, dict_size, d) and returns w (dict_size,).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is imported by whoever calls these; the registry's names load without it
    import torch

SalienceFn = Callable[["torch.Tensor"], "torch.Tensor"]


def _norms(W_dec: torch.Tensor) -> torch.Tensor:
    return W_dec.norm(dim=-1)  # (num_models, dict_size)


def paper_salience(W_dec: torch.Tensor) -> torch.Tensor:
    """MNEME paper: ||D_j^b||^2 + ||D_j^f||^2."""
    return W_dec.pow(2).sum(dim=(0, 2))


def crosscoder_salience(W_dec: torch.Tensor) -> torch.Tensor:
    """science-of-finetuning CROSSCODER: ||D_j^b|| + ||D_j^f||."""
    return _norms(W_dec).sum(dim=0)


def sae_salience(W_dec: torch.Tensor) -> torch.Tensor:
    """science-of-finetuning SAE: sqrt(||D_j^b||^2 + ||D_j^f||^2)."""
    return W_dec.pow(2).sum(dim=(0, 2)).sqrt()


def mixed_salience(W_dec: torch.Tensor) -> torch.Tensor:
    """science-of-finetuning MIXED: 1.0 * SAE + 0.1 * CROSSCODER."""
    return sae_salience(W_dec) + 0.1 * crosscoder_salience(W_dec)


def no_salience(W_dec: torch.Tensor) -> torch.Tensor:
    """science-of-finetuning NONE: every latent weighted 1."""
    return W_dec.new_ones(W_dec.shape[1])


SALIENCE_MODES: dict[str, SalienceFn] = {
    "paper": paper_salience,
    "crosscoder": crosscoder_salience,
    "sae": sae_salience,
    "mixed": mixed_salience,
    "none": no_salience,
}
