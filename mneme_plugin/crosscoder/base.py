"""``CrossCoder``: what every crosscoder over (base, edited) shares, and its own file format.

A crosscoder reads stacked raw activations x (B, 2, d) (index 0 base, 1 edited) through one
encoder, ``pre = relu(sum_l norm(x)_l W_enc^l + b_enc)``, keeps some codes by its sparsity rule
(``sparsify``, one per subclass) and decodes them per model, ``W_dec^l f + b_dec^l``, back to raw
activations. Subclasses (``mneme_plugin.crosscoder.registry``) are chosen by the ``architecture``
key of ``config.json``; normalisation is a strategy (``normalizers.NORMALIZERS``).

Capabilities are class attributes that the stages check with ``require_capability``, so that a
crosscoder a stage cannot use is refused with an error that names what it lacks.
"""

from __future__ import annotations

import json
import math
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from dictionary_learning.dictionary import Dictionary
from safetensors.torch import load_file, save_file
from torch import nn

from mneme_plugin.crosscoder.config import CrossCoderConfig
from mneme_plugin.crosscoder.files import CONFIG_FILE, WEIGHTS_FILE
from mneme_plugin.crosscoder.normalizers import NORMALIZERS
from mneme_plugin.crosscoder.salience import SALIENCE_MODES
from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.files import atomic_write, atomic_write_text, read_json

FORMAT_NAME = "mneme-crosscoder"
FORMAT_VERSION = 1
TENSOR_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "activation_scale")
# Tensors that may hold +inf: a threshold no code reaches (an SAE-Lens export gives a latent whose
# decoder is zero the threshold +inf, and its import keeps it).
MAY_BE_INFINITE = ("threshold", "latent_threshold", "model_thresholds")

# The weights stored latent-major: public name -> (parameter, permutation to the public layout, and back).
PUBLIC_LAYOUTS = {
    "W_enc": ("W_enc_by_latent", (1, 2, 0), (2, 0, 1)),  # (m, n, d) <-> (n, d, m)
    "W_dec": ("W_dec_by_latent", (1, 0, 2), (1, 0, 2)),  # (m, n, d) <-> (n, m, d)
}

# What each capability a stage may require means (for the error that names a missing one).
CAPABILITIES = {
    "shared_code": "one code per latent shared by both models",
}


class CrossCoder(Dictionary, nn.Module):
    """Base class of the crosscoders: shared encoder, per-model decoders, normalisation and I/O.

    ``encode`` returns unscaled codes f (B, m) of raw activations; ``decode`` maps codes back to raw
    (B, 2, d). Subclasses set ``architecture`` (the registry key), ``sparsity`` (the config value they
    implement), ``description`` and their capabilities, and implement ``sparsify``.
    """

    architecture: ClassVar[str] = ""
    sparsity: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Capabilities (see CAPABILITIES).
    shared_code: ClassVar[bool] = True
    # Tensors this architecture saves besides TENSOR_NAMES and its normaliser's buffers.
    variant_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: CrossCoderConfig) -> None:
        super().__init__()
        if not config.is_resolved:
            raise ValueError(
                "CrossCoderConfig needs activation_dim and dict_size to build a crosscoder; "
                "call config.resolve(d_model) first."
            )
        mismatch = self.config_mismatch(config)
        if mismatch:
            raise ConfigError(f"{type(self).__name__} (architecture {self.architecture!r}) cannot take this config: "
                              f"{mismatch}.")
        self.cfg = config
        self.activation_dim = config.activation_dim
        self.dict_size = config.dict_size
        self.k = config.k
        n, d, m = config.num_models, config.activation_dim, config.dict_size
        dtype = getattr(torch, config.dtype)
        # Encoder and decoder are stored latent-major, row j = latent j's vectors for both models (m, n, d);
        # ``W_enc`` (n, d, m) and ``W_dec`` (n, m, d) are views of them, the layouts of the files and of the
        # state dict (``PUBLIC_LAYOUTS``). The sparse step sums per latent and per row over one (m, n d) table,
        # so its gradients come out in this layout: no transposed or stacked copy of a weight each step.
        self.W_enc_by_latent = nn.Parameter(torch.empty(m, n, d, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=dtype))
        self.W_dec_by_latent = nn.Parameter(torch.empty(m, n, d, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(n, d, dtype=dtype))
        # Smallest kept salience of BatchTopK (-1 = not estimated yet); 0 for rules without batch dependence.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_buffer("activation_scale", torch.ones(n, dtype=torch.float32))
        self.normalizer = NORMALIZERS[config.normalization]
        for name, tensor in self.normalizer.make_buffers(n, d).items():
            self.register_buffer(name, tensor)
        for name, tensor in self.make_variant_tensors(config).items():
            self.register_buffer(name, tensor)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- set-up

    @classmethod
    def config_mismatch(cls, config: CrossCoderConfig) -> str | None:
        """Why ``config`` does not describe this architecture (None if it does)."""
        if cls.sparsity and config.sparsity != cls.sparsity:
            return f"sparsity is {config.sparsity!r}, expected {cls.sparsity!r}"
        if config.salience == "decoupled" and cls.shared_code:
            return "salience 'decoupled' needs per-model codes (DecoupledBatchTopKCrossCoder)"
        return None

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder (n, d, m): a view of ``W_enc_by_latent``; write into it with ``copy_``."""
        return self.W_enc_by_latent.permute(1, 2, 0)

    @property
    def W_dec(self) -> torch.Tensor:
        """The decoders (n, m, d): a view of ``W_dec_by_latent``; write into it with ``copy_``."""
        return self.W_dec_by_latent.permute(1, 0, 2)

    def encoder_matrix(self) -> torch.Tensor:
        """The encoder as one (n d, m) matrix, ``x.reshape(B, -1) @ encoder_matrix()``: a transposed view."""
        return self.W_enc_by_latent.reshape(self.dict_size, -1).t()

    def decoder_matrix(self) -> torch.Tensor:
        """The decoders as one (m, n d) matrix, ``(f @ decoder_matrix()).reshape(B, n, d)``: a view."""
        return self.W_dec_by_latent.reshape(self.dict_size, -1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        # The state dict keeps the public names and layouts (dictionary_learning's ``ae.pt``, checkpoints).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for public, (stored, to_public, _) in PUBLIC_LAYOUTS.items():
            tensor = destination.pop(prefix + stored).permute(to_public)
            destination[prefix + public] = tensor if keep_vars else tensor.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[no-untyped-def]
                              unexpected_keys, error_msgs):
        for public, (stored, _, to_stored) in PUBLIC_LAYOUTS.items():
            key, shape = prefix + public, tuple(getattr(self, public).shape)
            if key not in state_dict:
                continue
            tensor = state_dict.pop(key)
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == shape:
                state_dict[prefix + stored] = tensor.permute(to_stored)
            else:
                found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {found} from checkpoint, "
                                  f"the shape in current model is {shape}.")
                state_dict[prefix + stored] = getattr(self, stored).detach()  # reported above, not again
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for public, (stored, _, _) in PUBLIC_LAYOUTS.items():
            if prefix + stored in missing_keys:
                missing_keys[missing_keys.index(prefix + stored)] = prefix + public

    def make_variant_tensors(self, config: CrossCoderConfig) -> dict[str, torch.Tensor]:
        """Buffers of this architecture (named in ``variant_tensors``)."""
        return {}

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Zero weights: an imported crosscoder gets its weights from its loader."""
        for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec):
            p.zero_()

    def set_activation_scale(self, scale: torch.Tensor | list[float] | tuple[float, ...]) -> None:
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if scale.numel() != self.cfg.num_models or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise ValueError(
                f"activation_scale must be {self.cfg.num_models} positive finite factors, got {scale.tolist()}."
            )
        self.activation_scale.copy_(scale.to(self.activation_scale.device))

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """dictionary_learning's hook for input scaling: a dictionary trained on activations divided by
        ``scale`` reads undivided ones after ``scale_biases(scale)`` (``trainSAE(normalize_activations=True)``
        calls it before saving, and with ``1 / scale`` after a checkpoint). Their SAEs scale their biases
        and threshold, so their codes grow by ``scale``; a crosscoder normalises its input itself, so its
        normaliser takes the factor instead (``normalizers.ScaleNormalizer.rescale_input``): the same
        codes, biases and threshold, of undivided activations."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale_biases needs a positive finite factor, got {scale!r}.")
        self.normalizer.rescale_input(self, float(scale))

    def tensor_names(self) -> tuple[str, ...]:
        """Names of the tensors saved with this crosscoder (``TENSOR_NAMES`` plus its variant's)."""
        return TENSOR_NAMES + self.variant_tensors + self.normalizer.buffers

    # ----------------------------------------------------------------------------- math

    def salience_weights(self) -> torch.Tensor:
        """w_j (m,), the decoder-norm weight of latent j (config ``salience``)."""
        return SALIENCE_MODES[self.cfg.salience](self.W_dec)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.normalizer.normalize(self, x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer.denormalize(self, x)

    def pre_activations(self, x_norm: torch.Tensor) -> torch.Tensor:
        """relu(sum_l x_l W_enc^l + b_enc) on normalised inputs: (B, m)."""
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        return torch.relu(x_flat @ self.encoder_matrix() + self.b_enc)

    @abstractmethod
    def sparsify(self, pre: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """Codes (B, m) from pre-activations (B, m) by this architecture's sparsity rule."""

    def encode(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """Unscaled codes f (B, m) of raw activations x (B, 2, d)."""
        return self.sparsify(self.pre_activations(self.normalize(x)), use_threshold)

    def encode_per_model(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """Codes per model (B, 2, m): the shared code for both models unless the architecture has its own."""
        f = self.encode(x, use_threshold)
        return f[:, None, :].expand(f.shape[0], self.cfg.num_models, f.shape[1])

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 2, d) in raw activation scale from codes f (B, m)."""
        f = f.to(self.W_dec_by_latent.dtype)
        x_hat = (f @ self.decoder_matrix()).reshape(f.shape[0], *self.b_dec.shape) + self.b_dec
        return self.denormalize(x_hat)

    def forward(self, x: torch.Tensor, output_features: bool = False):  # type: ignore[override]
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    def jumprelu_thresholds(self) -> torch.Tensor:
        """Per-latent thresholds t_j (float64, CPU) with codes = pre_j * (pre_j > t_j), as SAE-Lens's jumprelu.

        (m,), or (2, m) for architectures with a code per model. Used by the SAE-Lens export.
        """
        raise ConfigError(
            f"{type(self).__name__} (architecture {self.architecture!r}) does not define per-latent thresholds on "
            "its pre-activations (jumprelu_thresholds), which the SAE-Lens export needs."
        )

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
            "architecture": self.architecture,
            "class": type(self).__name__,
            "config": self.cfg.to_dict(),
        }
        atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2))
        return path

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | os.PathLike[str], device: str | torch.device | None = None, **kwargs: Any
    ) -> "CrossCoder":
        """Load a crosscoder saved by ``save_pretrained``, as the class its ``architecture`` names.

        Files written before the ``architecture`` key get the class their config's flags describe.
        Called on a subclass, the file must hold that class (or one of its subclasses).
        """
        from mneme_plugin.crosscoder.registry import architecture_of, get_crosscoder_class

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
        try:  # ConfigMixin checks every field's type; name the file, which the user did not write by hand
            config = CrossCoderConfig.from_dict(meta["config"], section="config")
        except ConfigError as err:
            raise CheckpointError(
                f"{config_path} holds an invalid crosscoder config: {err} The file was edited or damaged; "
                "restore it from the training run."
            ) from err
        architecture = meta.get("architecture") or architecture_of(config)
        if not isinstance(architecture, str):
            raise CheckpointError(f"{config_path}: architecture is {architecture!r}, expected a name (a string). "
                                  "The file was edited or damaged; restore it from the training run.")
        try:
            klass = get_crosscoder_class(architecture)
        except ConfigError as err:
            raise CheckpointError(f"{config_path}: {err}") from err
        if not issubclass(klass, cls):
            raise CheckpointError(
                f"{path} holds a {klass.__name__} (architecture {architecture!r}), not a {cls.__name__}; "
                "load it with CrossCoder.from_pretrained or mneme_plugin.formats.load_crosscoder."
            )
        if config.activation_dim is None or config.dict_size is None:
            raise CheckpointError(f"{config_path} lacks config.activation_dim or config.dict_size. The file was "
                                  "edited or damaged; restore it from the training run.")
        try:
            model = klass(config)
        except ConfigError as err:
            raise CheckpointError(f"{config_path}: {err}") from err
        try:
            tensors = load_file(str(weights_path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{weights_path} is not a readable safetensors file: {err}") from err
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
        check_weights(weights_path, {name: tensors[name] for name in names})
        with torch.no_grad():
            for name in names:
                getattr(model, name).copy_(tensors[name])
        if device is not None:
            model = model.to(device)
        return model


def weights_problem(name: str, tensor: torch.Tensor, may_be_infinite: bool = False) -> str | None:
    """What is wrong with the weight tensor ``name`` (None if nothing): not floating point, or holding
    NaN / infinite values (``may_be_infinite``: +inf is allowed, as a threshold no code reaches)."""
    if not tensor.is_floating_point():
        return f"tensor {name!r} has dtype {tensor.dtype}, expected floating-point weights"
    bad = torch.isnan(tensor) | (tensor == float("-inf") if may_be_infinite else torch.isinf(tensor))
    n = int(bad.sum())
    if n:
        kind = "NaN or -inf" if may_be_infinite else "NaN or inf"
        return f"tensor {name!r} holds {n:,} non-finite value{'s' if n > 1 else ''} ({kind}) of {tensor.numel():,}"
    return None


def check_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming ``path`` and the tensor unless every tensor is floating point and finite
    (thresholds, ``MAY_BE_INFINITE``, may be +inf)."""
    for name, tensor in tensors.items():
        problem = weights_problem(name, tensor, may_be_infinite=name in MAY_BE_INFINITE)
        if problem:
            raise CheckpointError(f"{path}: {problem}. The file is damaged, or the training that wrote it "
                                  "diverged: restore the file, or train the crosscoder again.")


def require_capability(crosscoder: Any, capability: str, stage: str) -> None:
    """ConfigError naming what is missing unless ``crosscoder`` has ``capability`` (see ``CAPABILITIES``).

    An object that is not a ``CrossCoder`` is judged by the class its config describes.
    """
    from mneme_plugin.crosscoder.registry import architecture_of, get_crosscoder_class

    klass = type(crosscoder) if isinstance(crosscoder, CrossCoder) else get_crosscoder_class(
        architecture_of(crosscoder.cfg))
    if not getattr(klass, capability):
        raise ConfigError(
            f"{stage} needs a crosscoder with {CAPABILITIES[capability]} (capability {capability!r}); "
            f"{klass.__name__} (architecture {klass.architecture!r}: {klass.description}) lacks it. "
            "Use a crosscoder with that capability."
        )


def read_crosscoder_meta(config_path: Path) -> dict[str, Any]:
    """Parse and check a crosscoder ``config.json`` of this package's format."""
    meta = read_json(config_path, "the file may be truncated")
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
