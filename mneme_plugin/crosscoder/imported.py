"""Crosscoders this package imports but does not train: L1 (ReLU) and JumpReLU.

(The science-of-finetuning DECOUPLED BatchTopK crosscoder is ``model.DecoupledBatchTopKCrossCoder``.)
Their codes depend on one token only, so ``threshold`` is 0 (it tells the stages "no batch dependence").
"""

from __future__ import annotations

from typing import ClassVar

import torch

from mneme_plugin.crosscoder.base import CrossCoder
from mneme_plugin.crosscoder.config import CrossCoderConfig
from mneme_plugin.crosscoder.registry import register_crosscoder_class


class ReLUCrossCoder(CrossCoder):
    """An L1 crosscoder (Kissane; science-of-finetuning ``CrossCoder``): codes are the ReLU pre-activations."""

    architecture: ClassVar[str] = "relu"
    sparsity: ClassVar[str] = "relu"
    description: ClassVar[str] = "L1 crosscoder, codes = ReLU pre-activations"

    def __init__(self, config: CrossCoderConfig) -> None:
        super().__init__(config)
        self.threshold.fill_(0.0)

    def sparsify(self, pre: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        return pre

    def jumprelu_thresholds(self) -> torch.Tensor:
        return torch.zeros(self.dict_size, dtype=torch.float64)


class JumpReLUCrossCoder(CrossCoder):
    """A crosscoder with per-latent thresholds (our SAE-Lens exports): f_j = pre_j * (pre_j > latent_threshold_j)."""

    architecture: ClassVar[str] = "jumprelu"
    sparsity: ClassVar[str] = "jumprelu"
    description: ClassVar[str] = "JumpReLU, a threshold per latent"
    variant_tensors: ClassVar[tuple[str, ...]] = ("latent_threshold",)

    def __init__(self, config: CrossCoderConfig) -> None:
        super().__init__(config)
        self.threshold.fill_(0.0)

    def make_variant_tensors(self, config: CrossCoderConfig) -> dict[str, torch.Tensor]:
        return {"latent_threshold": torch.zeros(config.dict_size, dtype=torch.float32)}

    def sparsify(self, pre: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        return pre * (pre > self.latent_threshold.to(pre.dtype))

    def jumprelu_thresholds(self) -> torch.Tensor:
        return self.latent_threshold.detach().cpu().to(torch.float64)


register_crosscoder_class("relu", ReLUCrossCoder)
register_crosscoder_class("jumprelu", JumpReLUCrossCoder)
