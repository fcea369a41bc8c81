"""Input normalisations of a crosscoder, a small strategy per ``CrossCoderConfig.normalization``.

A strategy, not a subclass: normalisation is orthogonal to the sparsity rule (a science-of-finetuning
crosscoder is BatchTopK or L1, with or without their normaliser), so subclasses would multiply.
Every normalisation is the per-model affine map x' = (x - mu_l) * s_l, undone as y / s'_l + mu_l;
``affine`` gives (mu, s, s') so that exports can fold it into the weights without knowing the kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

    from mneme_plugin.crosscoder.base import CrossCoder

# science-of-finetuning's denormaliser divides by (scale + 1e-8).
MEAN_SCALE_EPS = 1e-8


class ScaleNormalizer:
    """x' = x * s_l (``activation_scale``, E||x'|| = sqrt(d)): the crosscoders trained here, Kissane's."""

    buffers: ClassVar[tuple[str, ...]] = ()

    def make_buffers(self, num_models: int, activation_dim: int) -> dict[str, torch.Tensor]:
        return {}

    def normalize(self, cc: "CrossCoder", x: torch.Tensor) -> torch.Tensor:
        dtype = cc.W_enc.dtype
        return x.to(dtype) * cc.activation_scale.to(dtype)[None, :, None]

    def denormalize(self, cc: "CrossCoder", y: torch.Tensor) -> torch.Tensor:
        return y / cc.activation_scale.to(y.dtype)[None, :, None]

    def rescale_input(self, cc: "CrossCoder", factor: float) -> None:
        """Read activations ``factor`` times those the crosscoder was fitted to, to the same normalised ones:
        x * (s / factor) = (x / factor) * s."""
        cc.activation_scale.div_(factor)

    def affine(self, cc: "CrossCoder") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu (n, d), s (n,), s' (n,)) in float64 on the CPU."""
        import torch  # here, not at the top: the configs read NORMALIZERS' names without torch (`mneme info`)

        s = cc.activation_scale.detach().cpu().double()
        return torch.zeros(s.numel(), cc.activation_dim, dtype=torch.float64), s, s


class MeanScaleNormalizer(ScaleNormalizer):
    """x' = (x - mu_l) * s_l, undone as y / (s_l + 1e-8) + mu_l (science-of-finetuning, keep_relative_variance)."""

    buffers: ClassVar[tuple[str, ...]] = ("activation_mean",)

    def make_buffers(self, num_models: int, activation_dim: int) -> dict[str, torch.Tensor]:
        import torch

        return {"activation_mean": torch.zeros(num_models, activation_dim, dtype=torch.float32)}

    def normalize(self, cc: "CrossCoder", x: torch.Tensor) -> torch.Tensor:
        dtype = cc.W_enc.dtype
        return (x.to(dtype) - cc.activation_mean.to(dtype)) * cc.activation_scale.to(dtype)[None, :, None]

    def denormalize(self, cc: "CrossCoder", y: torch.Tensor) -> torch.Tensor:
        scale = cc.activation_scale.to(y.dtype)[None, :, None]
        return y / (scale + MEAN_SCALE_EPS) + cc.activation_mean.to(y.dtype)

    def rescale_input(self, cc: "CrossCoder", factor: float) -> None:
        """(x - factor mu) * (s / factor) = (x / factor - mu) * s."""
        cc.activation_scale.div_(factor)
        cc.activation_mean.mul_(factor)

    def affine(self, cc: "CrossCoder") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = cc.activation_scale.detach().cpu().double()
        return cc.activation_mean.detach().cpu().double(), s, s + MEAN_SCALE_EPS


NORMALIZERS: dict[str, ScaleNormalizer] = {
    "scale": ScaleNormalizer(),
    "mean_scale": MeanScaleNormalizer(),
}
