"""The BatchTopK crosscoder: one shared encoder over both models, one decoder per model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from dictionary_learning.dictionary import Dictionary
from safetensors.torch import load_file, save_file
from torch import nn

from mneme_plugin.crosscoder.config import DECOUPLED, CrossCoderConfig
from mneme_plugin.crosscoder.salience import SALIENCE_MODES
from mneme_plugin.crosscoder.sparse import ActiveLatents, batch_topk_indices, gather_active, sparse_decode
from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import atomic_write, atomic_write_text

FORMAT_NAME = "mneme-crosscoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "activation_scale")
# science-of-finetuning's denormaliser divides by (scale + 1e-8).
_MEAN_SCALE_EPS = 1e-8


class BatchTopKCrossCoder(Dictionary, nn.Module):
    """A sparse crosscoder with BatchTopK sparsity (MNEME; Minder et al. 2025).

    Inputs are stacked activations ``x`` of shape (B, 2, d): index 0 the base model, 1 the edited
    model. ``encode`` returns unscaled codes f (B, m); ``decode`` maps them back to (B, 2, d).
    Per-model normalisation (``activation_scale``, so that E||x|| = sqrt(d)) is applied inside
    ``encode`` and undone in ``decode``: callers always pass and get raw activations.

    Imported variants (``mneme_plugin.formats``) are the same class, configured by the config:

    * ``sparsity="relu"``: codes are the ReLU pre-activations, no selection (L1 crosscoders);
    * ``sparsity="jumprelu"``: f_j = pre_j * (pre_j > latent_threshold_j) (SAE-Lens exports);
    * ``normalization="mean_scale"``: x' = (x - activation_mean_l) * activation_scale_l, undone as
      y / (activation_scale_l + 1e-8) + activation_mean_l (science-of-finetuning normaliser);
    * ``salience="decoupled"``: per-model weights w_j^l = ||D_j^l||, per-model thresholds
      ``model_thresholds`` (2,) (or per-model BatchTopK). Their codes are (B, 2, m)
      (``encode_per_model``); ``encode`` returns the (B, m) union ``max_l f_lj`` (each code is
      either pre_j or 0, so this is pre_j where any model keeps latent j) and ``decode`` re-applies
      the per-model rule to those codes, so ``decode(encode(x))`` is the original reconstruction.
      The scalar ``threshold`` then only says whether thresholds exist (its max over models).
    """

    def __init__(self, config: CrossCoderConfig) -> None:
        super().__init__()
        if not config.is_resolved:
            raise ValueError(
                "CrossCoderConfig needs activation_dim and dict_size to build a crosscoder; "
                "call config.resolve(d_model) first."
            )
        self.cfg = config
        self.activation_dim = config.activation_dim
        self.dict_size = config.dict_size
        self.k = config.k
        n, d, m = config.num_models, config.activation_dim, config.dict_size
        dtype = getattr(torch, config.dtype)
        self.W_enc = nn.Parameter(torch.empty(n, d, m, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(n, m, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        # Smallest kept salience, estimated during training; -1 = not estimated yet.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_buffer("activation_scale", torch.ones(n, dtype=torch.float32))
        self._decoupled = config.salience == DECOUPLED
        if self._decoupled:
            self.register_buffer("model_thresholds", torch.full((n,), -1.0, dtype=torch.float32))
        if config.normalization == "mean_scale":
            self.register_buffer("activation_mean", torch.zeros(n, d, dtype=torch.float32))
        if config.sparsity == "jumprelu":
            self.register_buffer("latent_threshold", torch.zeros(m, dtype=torch.float32))
        self.reset_parameters()

    # ----------------------------------------------------------------------------- set-up

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, dec_norm: float = 0.1) -> None:
        """Random decoder rows of norm ``dec_norm`` per model; encoder = decoder transpose."""
        n, m, d = self.W_dec.shape
        w = torch.randn(n, m, d, generator=generator, dtype=torch.float32)
        w = w / w.norm(dim=-1, keepdim=True) * dec_norm
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.permute(0, 2, 1))
        self.b_enc.zero_()
        self.b_dec.zero_()

    def set_activation_scale(self, scale: torch.Tensor | list[float] | tuple[float, ...]) -> None:
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if scale.numel() != self.cfg.num_models or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError(
                f"activation_scale must be {self.cfg.num_models} positive finite factors, got {scale.tolist()}."
            )
        self.activation_scale.copy_(scale.to(self.activation_scale.device))

    def tensor_names(self) -> tuple[str, ...]:
        """Names of the tensors saved with this crosscoder (``TENSOR_NAMES`` plus its variant's)."""
        extra = tuple(
            name for name in ("model_thresholds", "activation_mean", "latent_threshold") if hasattr(self, name)
        )
        return TENSOR_NAMES + extra

    @torch.no_grad()
    def set_model_thresholds(self, thresholds: torch.Tensor | list[float]) -> None:
        """Per-model thresholds of a DECOUPLED crosscoder (-1 = not estimated for that model)."""
        if not self._decoupled:
            raise ValueError("Per-model thresholds exist only for salience 'decoupled' crosscoders.")
        t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
        self.model_thresholds.copy_(t.to(self.model_thresholds.device))
        self.threshold.fill_(float(t.max()))

    # ----------------------------------------------------------------------------- math

    def salience_weights(self) -> torch.Tensor:
        """w_j, the decoder-norm weight that ranks latents (config ``salience``).

        (m,), or (2, m) for ``decoupled`` (w_j^l = ||D_j^l||).
        """
        if self._decoupled:
            return self.W_dec.norm(dim=-1)
        return SALIENCE_MODES[self.cfg.salience](self.W_dec)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.cfg.normalization == "mean_scale":
            dtype = self.W_enc.dtype
            return (x.to(dtype) - self.activation_mean.to(dtype)) * self.activation_scale.to(dtype)[None, :, None]
        return x.to(self.W_enc.dtype) * self.activation_scale.to(self.W_enc.dtype)[None, :, None]

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalization == "mean_scale":
            scale = self.activation_scale.to(x.dtype)[None, :, None]
            return x / (scale + _MEAN_SCALE_EPS) + self.activation_mean.to(x.dtype)
        return x / self.activation_scale.to(x.dtype)[None, :, None]

    def pre_activations(self, x_norm: torch.Tensor) -> torch.Tensor:
        """relu(sum_l x_l W_enc^l + b_enc) on normalised inputs: (B, m)."""
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        return torch.relu(x_flat @ self.W_enc.reshape(-1, self.dict_size) + self.b_enc)

    def encode(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """Unscaled codes f (B, m) of raw activations x (B, 2, d).

        ``use_threshold``: True keeps latents whose salience exceeds the estimated threshold (one
        token encodes alone); False applies BatchTopK over the batch; None (default) uses the
        threshold once it has been estimated and BatchTopK before that.
        """
        pre = self.pre_activations(self.normalize(x))
        if not self.cfg.is_default_variant:
            if self.cfg.sparsity == "relu":
                return pre
            if self.cfg.sparsity == "jumprelu":
                return pre * (pre > self.latent_threshold.to(pre.dtype))
            if self._decoupled:
                return self._decoupled_codes(pre, use_threshold).amax(dim=1)
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
        top = batch_topk_indices(salience, self.k * x.shape[0])
        mask = torch.zeros_like(salience).reshape(-1)
        mask[top] = 1
        return pre * mask.reshape(salience.shape) * (salience > 0)

    def encode_per_model(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """Codes per model (B, 2, m): a DECOUPLED crosscoder's own codes; else ``encode`` on both."""
        if self._decoupled:
            return self._decoupled_codes(self.pre_activations(self.normalize(x)), use_threshold)
        f = self.encode(x, use_threshold)
        return f[:, None, :].expand(f.shape[0], self.cfg.num_models, f.shape[1])

    def _decoupled_codes(self, values: torch.Tensor, use_threshold: bool | None) -> torch.Tensor:
        """Per-model codes (B, 2, m) of a DECOUPLED crosscoder from pre-activations (or union codes)."""
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
        """Reconstruction (B, 2, d) in raw activation scale from codes f (B, m).

        A DECOUPLED crosscoder also takes per-model codes (B, 2, m); (B, m) codes are gated per
        model by its rule first (see the class docstring).
        """
        if self._decoupled:
            f = f.to(self.W_dec.dtype)
            f3 = f if f.ndim == 3 else self._decoupled_codes(f, None)
            x_hat = torch.einsum("blm,lmd->bld", f3, self.W_dec) + self.b_dec
            return self.denormalize(x_hat)
        x_hat = torch.einsum("bm,lmd->bld", f.to(self.W_dec.dtype), self.W_dec) + self.b_dec
        return self.denormalize(x_hat)

    def forward(self, x: torch.Tensor, output_features: bool = False):  # type: ignore[override]
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    def salience_matrix(self, x_norm: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """s = relu(x W_enc + b_enc) * w (B, m), computed as one matmul with w folded in (w > 0)."""
        weights = self.salience_weights() if weights is None else weights
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        W_scaled = self.W_enc.reshape(-1, self.dict_size) * weights
        return torch.relu_(torch.addmm(self.b_enc * weights, x_flat, W_scaled))

    def batch_topk_active(self, x_norm: torch.Tensor) -> tuple[ActiveLatents, torch.Tensor, torch.Tensor]:
        """Training path: active pairs of BatchTopK, with sparse gradients.

        Returns (active, salience, weights); salience (B, m) and weights (m,) are detached.
        """
        if not self.cfg.is_default_variant:
            raise ValueError(
                f"Training is only implemented for BatchTopK crosscoders with sparsity 'batchtopk', normalization "
                f"'scale' and a shared salience; this one has sparsity {self.cfg.sparsity!r}, normalization "
                f"{self.cfg.normalization!r}, salience {self.cfg.salience!r} (an imported crosscoder)."
            )
        with torch.no_grad():
            weights = self.salience_weights().clamp_min(torch.finfo(self.W_dec.dtype).tiny)
            salience = self.salience_matrix(x_norm, weights)
            flat_index = batch_topk_indices(salience, self.k * x_norm.shape[0])
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        W_enc_flat = self.W_enc.reshape(-1, self.dict_size)
        active = gather_active(W_enc_flat, self.b_enc, x_flat, salience, weights, flat_index)
        return active, salience, weights

    def decode_active(self, active: ActiveLatents, bias: bool = True) -> torch.Tensor:
        """Normalised reconstruction (B, 2, d) from active pairs (sparse)."""
        out = sparse_decode(active, self.W_dec)
        return out + self.b_dec if bias else out

    # ----------------------------------------------------------------------------- checks

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.cfg.num_models, self.activation_dim)
        if x.ndim != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"Expected stacked activations of shape (batch, {expected[0]}, {expected[1]}) "
                f"[index 0 base, 1 edited], got {tuple(x.shape)}."
            )

    # ----------------------------------------------------------------------------- I/O

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into the directory ``path``, atomically per file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self.tensor_names()}
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME}))
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "class": type(self).__name__,
            "config": self.cfg.to_dict(),
        }
        atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2))
        return path

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | os.PathLike[str], device: str | torch.device | None = None, **kwargs: Any
    ) -> "BatchTopKCrossCoder":
        """Load a crosscoder saved by ``save_pretrained`` (this package's own format)."""
        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}.")
        for required in (config_path, weights_path):
            if not required.is_file():
                raise CheckpointError(
                    f"{required} is missing: a mneme crosscoder directory holds {CONFIG_FILE} and {WEIGHTS_FILE}."
                )
        meta = read_crosscoder_meta(config_path)
        config = CrossCoderConfig.from_dict(meta["config"])
        try:
            tensors = load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{weights_path} is not a readable safetensors file: {err}") from err
        model = cls(config)
        names = model.tensor_names()
        missing = [name for name in names if name not in tensors]
        if missing:
            raise CheckpointError(f"{weights_path} lacks tensors {missing}; expected {list(names)}.")
        for name in names:
            target = getattr(model, name)
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{weights_path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                    f"but config.json implies {tuple(target.shape)}."
                )
        with torch.no_grad():
            for name in names:
                getattr(model, name).copy_(tensors[name])
        if device is not None:
            model = model.to(device)
        return model


def read_crosscoder_meta(config_path: Path) -> dict[str, Any]:
    """Parse and check a crosscoder ``config.json`` of this package's format."""
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}); the file may be truncated.") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        hint = ""
        if isinstance(meta, dict) and ("trainer" in meta or "dict_class" in meta or "d_in" in meta):
            hint = " It looks like a crosscoder from another project (science-of-finetuning, Kissane or SAE-Lens)."
        raise CheckpointError(
            f"{config_path} is not a mneme crosscoder config (expected \"format\": \"{FORMAT_NAME}\").{hint}"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {meta['format_version']}, newer than this mneme-plugin "
            f"understands ({FORMAT_VERSION}); upgrade mneme-plugin."
        )
    if "config" not in meta:
        raise CheckpointError(f"{config_path} has no \"config\" entry.")
    return meta

