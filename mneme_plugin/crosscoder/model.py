"""The BatchTopK crosscoder this package trains (MNEME; Minder et al. 2025), and its DECOUPLED variant."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from mneme_plugin.crosscoder.base import (  # noqa: F401  (file-format names, re-exported)
    CONFIG_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TENSOR_NAMES,
    WEIGHTS_FILE,
    CrossCoder,
    read_crosscoder_meta,
)
from mneme_plugin.crosscoder.config import DECOUPLED, CrossCoderConfig
from mneme_plugin.crosscoder.registry import register_crosscoder_class
from mneme_plugin.crosscoder.sparse import ActiveLatents, batch_topk_indices, gather_active, sparse_decode
from mneme_plugin.errors import ConfigError


def _jumprelu_ratio(t: float, w: torch.Tensor) -> torch.Tensor:
    """t / w_j (+inf where w_j = 0): salience pre_j w_j > t as a threshold on pre_j; 0 where t < 0."""
    if t < 0:  # a DECOUPLED model without a threshold: their mask keeps every positive code
        return torch.zeros_like(w)
    return torch.where(w > 0, t / torch.where(w > 0, w, torch.ones_like(w)), torch.full_like(w, float("inf")))


class BatchTopKCrossCoder(CrossCoder):
    """A sparse crosscoder with BatchTopK sparsity (MNEME; Minder et al. 2025), the one trained here.

    Inputs are stacked activations ``x`` of shape (B, 2, d): index 0 the base model, 1 the edited
    model. ``encode`` returns unscaled codes f (B, m); ``decode`` maps them back to (B, 2, d).
    Per-model normalisation (``activation_scale``, so that E||x|| = sqrt(d)) is applied inside
    ``encode`` and undone in ``decode``: callers always pass and get raw activations.

    Latents are ranked by salience pre_j * w_j (w_j from config ``salience``); BatchTopK keeps the
    k * B largest over the batch, or, once estimated, those above the inference ``threshold``.
    Imported science-of-finetuning BatchTopK crosscoders are this class too (any salience mode,
    normalization ``mean_scale``); training takes the default variant only.
    """

    architecture: ClassVar[str] = "batchtopk"
    sparsity: ClassVar[str] = "batchtopk"
    description: ClassVar[str] = "BatchTopK over a code shared by both models"

    # ----------------------------------------------------------------------------- set-up

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, dec_norm: float = 1.0) -> None:
        """Random decoder rows of norm ``dec_norm`` per model; encoder = decoder transpose.

        Norm 1 (the science-of-finetuning ``norm_init_scale``) starts pre-activations at the scale of
        the normalised inputs (E||x_l|| = sqrt(d)). Rows of norm 0.1 made every latent start 100x too
        weak; the few that grew first took the BatchTopK budget and most of the others never fired
        (planted recovery 0.61 -> 0.89, dead 71% -> 20% on the same run). The trainer passes
        ``training.decoder_init_norm``.
        """
        n, m, d = self.W_dec.shape
        w = torch.randn(n, m, d, generator=generator, dtype=torch.float32)
        w = w / w.norm(dim=-1, keepdim=True) * dec_norm
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.permute(0, 2, 1))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ----------------------------------------------------------------------------- math

    def sparsify(self, pre: torch.Tensor, use_threshold: bool | None = None,
                 select: Callable[[torch.Tensor, int], torch.Tensor] = batch_topk_indices) -> torch.Tensor:
        """BatchTopK codes (B, m) of pre-activations.

        ``use_threshold``: True keeps latents whose salience exceeds the estimated threshold (one
        token encodes alone); False applies BatchTopK over the batch; None (default) uses the
        threshold once it has been estimated and BatchTopK before that. ``select(salience, k * B)``
        picks BatchTopK's flat indices (the evaluation of a data-parallel run passes a selection over
        the global batch, as ``batch_topk_active`` does).
        """
        salience = pre * self.salience_weights()
        if use_threshold is None:
            use_threshold = bool(self.threshold >= 0)
        if use_threshold:
            if self.threshold < 0:
                raise ValueError(
                    "This crosscoder has no inference threshold yet (it is estimated during training "
                    "after threshold_start_step); encode with use_threshold=False for BatchTopK."
                )
            return pre * (salience > self.threshold.to(salience.dtype))
        top = select(salience, self.k * pre.shape[0])
        mask = torch.zeros_like(salience).reshape(-1)
        mask[top] = 1
        return pre * mask.reshape(salience.shape) * (salience > 0)

    def jumprelu_thresholds(self) -> torch.Tensor:
        t = float(self.threshold)
        if t < 0:
            raise ConfigError(
                "This crosscoder has no inference threshold yet (BatchTopK only); SAE-Lens's jumprelu needs one. "
                "Train past threshold_start_step first."
            )
        return _jumprelu_ratio(t, self.salience_weights().detach().cpu().to(torch.float64))

    # ----------------------------------------------------------------------------- training

    def salience_matrix(self, x_norm: torch.Tensor, weights: torch.Tensor | None = None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """s = relu(x W_enc + b_enc) * w (B, m), computed as one matmul with w folded in (w > 0);
        written into ``out`` when given."""
        weights = self.salience_weights() if weights is None else weights
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        W_scaled = self.W_enc_by_latent.reshape(self.dict_size, -1) * weights[:, None]  # (m, n d): w_j scales row j
        return torch.relu_(torch.addmm(self.b_enc * weights, x_flat, W_scaled.t(), out=out))

    def _salience_buffer(self, x_norm: torch.Tensor) -> torch.Tensor | None:
        """The training step's (B, m) salience buffer, reused from step to step on CPU: a fresh tensor
        of that size costs its page faults every step (about 20 ms of a 250 ms step at B=1024, m=8192).
        None where reuse does not pay or does not fit (GPU caching allocator, autocast)."""
        if x_norm.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x_norm.requires_grad:
            return None
        shape = (x_norm.shape[0], self.dict_size)
        buffer = self.__dict__.get("_salience_scratch")
        if buffer is None or buffer.shape != shape or buffer.dtype != self.W_enc.dtype:
            buffer = torch.empty(shape, dtype=self.W_enc.dtype)
            self.__dict__["_salience_scratch"] = buffer  # a plain attribute: not a parameter, not saved
        return buffer

    def batch_topk_active(
        self, x_norm: torch.Tensor, select: Callable[[torch.Tensor, int], torch.Tensor] = batch_topk_indices
    ) -> tuple[ActiveLatents, torch.Tensor, torch.Tensor]:
        """Training path: active pairs of BatchTopK, with sparse gradients.

        ``select(salience, k * B)`` picks the flat indices kept (the data-parallel trainer passes
        a selection over the global batch). Returns (active, salience, weights); salience (B, m)
        and weights (m,) are detached.
        """
        if not self.cfg.is_default_variant:
            raise ValueError(
                f"Training is only implemented for BatchTopK crosscoders with sparsity 'batchtopk', normalization "
                f"'scale' and a shared salience; this one has sparsity {self.cfg.sparsity!r}, normalization "
                f"{self.cfg.normalization!r}, salience {self.cfg.salience!r} (an imported crosscoder)."
            )
        with torch.no_grad():
            weights = self.salience_weights().clamp_min(torch.finfo(self.W_dec.dtype).tiny)
            salience = self.salience_matrix(x_norm, weights, out=self._salience_buffer(x_norm))
            flat_index = select(salience, self.k * x_norm.shape[0])
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        active = gather_active(self.encoder_matrix(), self.b_enc, x_flat, salience, weights, flat_index)
        return active, salience, weights

    def decode_active(self, active: ActiveLatents, bias: bool = True) -> torch.Tensor:
        """Normalised reconstruction (B, 2, d) from active pairs (sparse)."""
        out = sparse_decode(active, self.W_dec)
        return out + self.b_dec if bias else out


class DecoupledBatchTopKCrossCoder(BatchTopKCrossCoder):
    """An imported science-of-finetuning DECOUPLED BatchTopK crosscoder: one code per model.

    Per-model weights w_j^l = ||D_j^l||, per-model thresholds ``model_thresholds`` (2,) (or per-model
    BatchTopK). Their codes are (B, 2, m) (``encode_per_model``); ``encode`` returns the (B, m) union
    ``max_l f_lj`` (each code is either pre_j or 0, so this is pre_j where any model keeps latent j) and
    ``decode`` re-applies the per-model rule to those codes, so ``decode(encode(x))`` is the original
    reconstruction. The scalar ``threshold`` then only says whether thresholds exist (its max over models).
    """

    architecture: ClassVar[str] = "batchtopk_decoupled"
    description: ClassVar[str] = "science-of-finetuning DECOUPLED BatchTopK, a separate code per model"
    shared_code: ClassVar[bool] = False
    variant_tensors: ClassVar[tuple[str, ...]] = ("model_thresholds",)

    @classmethod
    def config_mismatch(cls, config: CrossCoderConfig) -> str | None:
        if config.sparsity != cls.sparsity or config.salience != DECOUPLED:
            return (f"it needs sparsity 'batchtopk' and salience {DECOUPLED!r}, got {config.sparsity!r} and "
                    f"{config.salience!r}")
        return None

    def make_variant_tensors(self, config: CrossCoderConfig) -> dict[str, torch.Tensor]:
        return {"model_thresholds": torch.full((config.num_models,), -1.0, dtype=torch.float32)}

    @torch.no_grad()
    def set_model_thresholds(self, thresholds: torch.Tensor | list[float]) -> None:
        """Per-model thresholds (-1 = not estimated for that model)."""
        t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        self.model_thresholds.copy_(t.to(self.model_thresholds.device))
        self.threshold.fill_(float(t.max()))

    def salience_weights(self) -> torch.Tensor:
        """w_j^l = ||D_j^l||: (2, m)."""
        return self.W_dec.norm(dim=-1)

    def sparsify(self, pre: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        return self._per_model_codes(pre, use_threshold).amax(dim=1)

    def encode_per_model(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        return self._per_model_codes(self.pre_activations(self.normalize(x)), use_threshold)

    def _per_model_codes(self, values: torch.Tensor, use_threshold: bool | None) -> torch.Tensor:
        """Per-model codes (B, 2, m) from pre-activations (or union codes)."""
        weights = self.salience_weights().to(values.dtype)  # (2, m)
        scaled = values[:, None, :] * weights[None]
        has_threshold = bool((self.model_thresholds >= 0).any())
        if use_threshold is None:
            use_threshold = has_threshold
        if use_threshold:
            if not has_threshold:
                raise ValueError(
                    "This DECOUPLED crosscoder has no inference thresholds; encode with use_threshold=False."
                )
            mask = scaled > self.model_thresholds.to(scaled.dtype)[None, :, None]
        else:
            mask = torch.zeros_like(scaled, dtype=torch.bool)
            for layer in range(scaled.shape[1]):
                top = batch_topk_indices(scaled[:, layer], self.k * values.shape[0])
                layer_mask = torch.zeros(scaled[:, layer].numel(), dtype=torch.bool, device=values.device)
                layer_mask[top] = True
                mask[:, layer] = layer_mask.reshape(values.shape)
            mask &= scaled > 0
        return values[:, None, :] * mask

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 2, d) from per-model codes (B, 2, m), or from (B, m) codes gated per model first."""
        f = f.to(self.W_dec.dtype)
        f3 = f if f.ndim == 3 else self._per_model_codes(f, None)
        x_hat = torch.einsum("blm,lmd->bld", f3, self.W_dec) + self.b_dec
        return self.denormalize(x_hat)

    def jumprelu_thresholds(self) -> torch.Tensor:
        """(2, m): latent j as gated for model l."""
        t = self.model_thresholds.detach().cpu().tolist()
        if max(t) < 0:
            raise ConfigError("This DECOUPLED crosscoder has no inference thresholds; SAE-Lens needs them.")
        w = self.salience_weights().detach().cpu().to(torch.float64)
        return torch.stack([_jumprelu_ratio(t[layer], w[layer]) for layer in range(len(t))])


register_crosscoder_class("batchtopk", BatchTopKCrossCoder)
register_crosscoder_class("batchtopk_decoupled", DecoupledBatchTopKCrossCoder)
