"""Import science-of-finetuning crosscoders (their ``dictionary_learning`` fork).

Layouts: the hub layout (``model.safetensors`` + ``config.json`` with the init kwargs +
``trainer_config.json`` = ``{"trainer": {...}}``) and local training output (``model_final.pt`` or
``checkpoint_{step}.pt`` + ``config.json`` = ``{"trainer": {...}}``), possibly with ``_orig_mod.``
prefixes (torch.compile). Classes: ``BatchTopKCrossCoder`` (-> sparsity ``batchtopk``, their
``k`` and ``threshold``) and the L1 ``CrossCoder`` (-> sparsity ``relu``: its ``encode`` is the ReLU
pre-activation, with no selection). Code normalisation CROSSCODER / SAE / MIXED / NONE map to the
salience modes of the same name, DECOUPLED to ``decoupled`` (per-model thresholds). Their activation
normaliser (``activation_mean`` / ``activation_global_scale``) maps to normalization ``mean_scale``.

A DECOUPLED BatchTopK crosscoder with their normaliser reads its input normalised twice: their
``BatchTopKCrossCoder.encode`` normalises it, and its DECOUPLED branch (``encode_decoupled``) calls
``CrossCoder.encode``, which normalises it again; it trained that way, and decodes (denormalises) once.
n(n(x)) = s n(x) - s mu is affine in n(x), so the second normalisation is folded into the encoder
(W_enc^l <- s_l W_enc^l, b_enc <- b_enc - sum_l s_l mu_l W_enc^l) and the crosscoder encodes as theirs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from mneme_plugin.crosscoder.config import CrossCoderConfig
from mneme_plugin.crosscoder.base import CrossCoder, check_weights
from mneme_plugin.crosscoder.registry import build_crosscoder
from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.formats.common import (
    config_int, config_number, dtype_name, load_tensors, read_json, require_tensor, scalar_int,
)

logger = logging.getLogger("mneme_plugin")

FORMAT = "science-of-finetuning"
CODE_NORMALIZATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
SALIENCE_OF = {"CROSSCODER": "crosscoder", "SAE": "sae", "MIXED": "mixed", "NONE": "none", "DECOUPLED": "decoupled"}
CLASSES = ("BatchTopKCrossCoder", "CrossCoder")
WEIGHT_FILES = ("model.safetensors", "model_final.pt")
EXPECTED = (
    "a science-of-finetuning crosscoder state dict (encoder.weight (2, d, m), encoder.bias (m), "
    "decoder.weight (2, m, d), decoder.bias (2, d))"
)


def find_weights(folder: Path) -> Path | None:
    """The weights file of a science-of-finetuning folder (model.safetensors, model_final.pt, newest checkpoint)."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    checkpoints = []
    for p in folder.glob("checkpoint_*.pt"):
        m = re.fullmatch(r"checkpoint_(\d+)\.pt", p.name)
        if m:
            checkpoints.append((int(m.group(1)), p))
    return max(checkpoints)[1] if checkpoints else None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith("_orig_mod."):
            key = key[len("_orig_mod."):]
        key = key.replace("._orig_mod.", ".")
        out[key] = value
    return out


def _configs(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(init kwargs, trainer config) from config.json / trainer_config.json, where present."""
    init: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        cfg = read_json(folder / "config.json", "a science-of-finetuning config")
        if isinstance(cfg.get("trainer"), dict):
            trainer = dict(cfg["trainer"])  # local training output: config.json = {"trainer": ...}
        else:
            init = cfg
    if (folder / "trainer_config.json").is_file():
        tcfg = read_json(folder / "trainer_config.json", 'a trainer config {"trainer": {...}}')
        trainer = tcfg.get("trainer", tcfg)
        if not isinstance(trainer, dict):
            raise CheckpointError(f"{folder / 'trainer_config.json'}: \"trainer\" is a {type(trainer).__name__}, "
                                  'expected a mapping {"trainer": {...}} of the training settings.')
        trainer = dict(trainer)
    return init, trainer


def _configured_k(init: dict[str, Any], trainer: dict[str, Any], folder: Path, what: str) -> int | None:
    """k from ``config.json``, else from the trainer config; None when neither gives one."""
    if init.get("k") is not None:
        return config_int(init, "k", folder / "config.json", what)
    if trainer.get("k") is not None:
        return config_int(trainer, "k", folder, f"{what} (trainer config)")
    return None


def _code_normalization(state: dict[str, torch.Tensor], init: dict[str, Any], trainer: dict[str, Any],
                        path: Path) -> str:
    if "code_normalization_id" in state:
        value = scalar_int(state, "code_normalization_id", path, "the code normalisation id")
        if value not in CODE_NORMALIZATIONS:
            raise CheckpointError(
                f"{path}: code_normalization_id {value} is unknown; expected one of {CODE_NORMALIZATIONS}."
            )
        return CODE_NORMALIZATIONS[value]
    for source in (init, trainer):
        value = source.get("code_normalization")
        if value is not None:
            name = CODE_NORMALIZATIONS.get(value, None) if isinstance(value, int) else str(value).split(".")[-1].upper()
            if name not in SALIENCE_OF:
                raise CheckpointError(f"{path}: code_normalization {value!r} is unknown; expected {sorted(SALIENCE_OF)}.")
            return name
    logger.warning("%s has no code normalisation id (an older checkpoint): assuming CROSSCODER, as their code does.", path)
    return "CROSSCODER"


def _check_normaliser_pair(mean: torch.Tensor | None, std: torch.Tensor | None, path: Path) -> None:
    """Their normaliser is ``activation_mean`` and ``activation_std`` together, or neither (both absent,
    as in checkpoints older than it, or both NaN): ``NormalizableMixin`` sets both or fills both with NaN,
    normalises only when neither holds NaN, and their loader refuses a file holding part of the
    normaliser. A file with one of them only cannot be read as they would: CheckpointError."""
    def state(t: torch.Tensor | None) -> str:
        return "missing" if t is None else "NaN" if bool(torch.isnan(t).all()) else "recorded"

    states = {"activation_mean": state(mean), "activation_std": state(std)}
    recorded = [name for name, s in states.items() if s == "recorded"]
    if len(recorded) == 1:
        other = next(name for name in states if name != recorded[0])
        raise CheckpointError(
            f"{path} records {recorded[0]} but {other} is {states[other]}: a science-of-finetuning crosscoder "
            "normalises its inputs with both (mean and std) or with neither (both NaN), so this one cannot be "
            "read as its code would. The file was edited or damaged: restore the file from where it came from."
        )


def load_science_of_finetuning(path: str | Path, dict_class: str | None = None) -> CrossCoder:
    """A science-of-finetuning crosscoder from its folder or weights file: a ``BatchTopKCrossCoder``
    (``DecoupledBatchTopKCrossCoder`` for DECOUPLED) or, for their L1 ``CrossCoder``, a ``ReLUCrossCoder``."""
    path = Path(path)
    if path.is_dir():
        folder, weights = path, find_weights(path)
        if weights is None:
            raise CheckpointError(
                f"{path} holds no science-of-finetuning weights: expected model.safetensors, model_final.pt "
                "or checkpoint_<step>.pt."
            )
    else:
        folder, weights = path.parent, path
    init, trainer = _configs(folder)
    state = _strip_prefixes(load_tensors(weights, EXPECTED))
    enc = require_tensor(state, "encoder.weight", None, weights, EXPECTED)
    if enc.ndim != 3:
        raise CheckpointError(f"{weights}: encoder.weight has shape {tuple(enc.shape)}, expected (2, d, m). {EXPECTED}")
    n, d, m = enc.shape
    if n != 2:
        raise CheckpointError(
            f"{weights}: the crosscoder reads {n} models/layers; mneme handles crosscoders over exactly 2 (base, edited)."
        )
    b_enc = require_tensor(state, "encoder.bias", (m,), weights, EXPECTED)
    W_dec = require_tensor(state, "decoder.weight", (n, m, d), weights, EXPECTED)
    b_dec = require_tensor(state, "decoder.bias", (n, d), weights, EXPECTED)

    cls_name = dict_class or init.get("dict_class") or trainer.get("dict_class")
    if cls_name is None:
        cls_name = "BatchTopKCrossCoder" if "k" in state else "CrossCoder"
    if cls_name not in CLASSES:
        raise CheckpointError(f"{folder}: dict_class {cls_name!r} is not supported; expected one of {CLASSES}.")
    batch_topk = cls_name == "BatchTopKCrossCoder"
    code_norm = _code_normalization(state, init, trainer, weights)
    alphas = tuple(config_number(init, key, folder / "config.json", "a number", default)
                   for key, default in (("code_normalization_alpha_sae", 1.0), ("code_normalization_alpha_cc", 0.1)))
    if code_norm == "MIXED" and alphas != (1.0, 0.1):
        raise CheckpointError(
            f"{folder}: MIXED code normalisation with alphas {alphas} is not supported (only 1.0 * SAE + 0.1 * CROSSCODER)."
        )
    salience = SALIENCE_OF[code_norm]
    if batch_topk:
        k = (scalar_int(state, "k", weights, "the BatchTopK k") if "k" in state
             else _configured_k(init, trainer, folder, "the BatchTopK k"))
        if k is None:
            raise CheckpointError(f"{weights} is a BatchTopKCrossCoder without k (no 'k' tensor, no k in the configs).")
        sparsity = "batchtopk"
    else:
        k = min(_configured_k(init, trainer, folder, "k (a whole number)") or 100, m)
        sparsity = "relu"
        if salience == "decoupled":
            salience = "crosscoder"  # encoding of an L1 crosscoder does not use the weights

    mean, std = state.get("activation_mean"), state.get("activation_std")
    for name, t in (("activation_mean", mean), ("activation_std", std)):
        if t is not None and not (t.is_floating_point() and torch.isnan(t).all()):  # all NaN: "no normaliser"
            check_weights(weights, {name: t})
    _check_normaliser_pair(mean, std, weights)
    has_normalizer = (
        mean is not None and std is not None and not torch.isnan(mean).any() and not torch.isnan(std).any()
    )
    if has_normalizer:
        if tuple(mean.shape) != (n, d) or tuple(std.shape) != (n, d):
            raise CheckpointError(
                f"{weights}: activation_mean / activation_std have shapes {tuple(mean.shape)} / {tuple(std.shape)}, "
                f"expected ({n}, {d})."
            )
        if "activation_global_scale" in state:
            scale = require_tensor(state, "activation_global_scale", (n,), weights, "per-model normaliser scales")
        else:
            target = state.get("target_rms")
            if target is None:  # older checkpoints: the init kwarg (their default 1)
                rms = (config_number(init, "target_rms", folder / "config.json", "their normaliser's target_rms", 1.0)
                       if init.get("target_rms") is not None else 1.0)
                target = torch.tensor(rms or 1.0)
            check_weights(weights, {"target_rms": target})
            scale = target / torch.sqrt((std.double() ** 2).sum(-1) + 1e-8)

    metadata: dict[str, Any] = {
        "source_format": FORMAT,
        "source": str(path),
        "dict_class": cls_name,
        "code_normalization": code_norm,
    }
    if has_normalizer and batch_topk and salience == "decoupled":
        metadata["encoder_input"] = "normalised twice, as their DECOUPLED encode does (folded into W_enc, b_enc)"
    for key in ("lm_name", "layer", "base_model", "chat_model", "wandb_name"):
        if key in trainer and isinstance(trainer[key], (str, int, float)):
            metadata[key] = trainer[key]
    try:
        config = CrossCoderConfig(
            activation_dim=d, dict_size=m, k=k, salience=salience, sparsity=sparsity,
            normalization="mean_scale" if has_normalizer else "scale", dtype=dtype_name(enc, weights), metadata=metadata,
        )
    except ConfigError as err:
        raise CheckpointError(f"{weights} describes no valid crosscoder: {err}") from err
    model = build_crosscoder(config)
    with torch.no_grad():
        model.W_enc.copy_(enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(W_dec)
        model.b_dec.copy_(b_dec)
        if has_normalizer:
            model.activation_mean.copy_(mean)
            model.activation_scale.copy_(scale)
            if batch_topk and salience == "decoupled":  # their second normalisation (module docstring)
                s, mu, W = scale.double(), mean.double(), enc.double()
                model.b_enc.copy_(b_enc.double() - torch.einsum("l,ld,ldm->m", s, mu, W))
                model.W_enc.copy_(W * s[:, None, None])
        threshold = state.get("threshold")
        if threshold is not None:
            check_weights(weights, {"threshold": threshold})
        # (L1 crosscoders: no threshold, their ReLUCrossCoder has 0.)
        if batch_topk and salience == "decoupled":
            t = threshold if threshold is not None else torch.full((n,), -1.0)
            if t.numel() != n:
                raise CheckpointError(f"{weights}: a DECOUPLED crosscoder needs a threshold per model ({n}), got shape {tuple(t.shape)}.")
            model.set_model_thresholds(t.float().reshape(-1))
        elif batch_topk and threshold is not None:
            if threshold.numel() != 1:
                raise CheckpointError(f"{weights}: threshold has shape {tuple(threshold.shape)}, expected a scalar.")
            model.threshold.fill_(float(threshold.item()))
    if batch_topk and (threshold is None or bool((threshold < 0).all())):
        # Their encode() with a threshold of -1 keeps every positive pre-activation: no sparsity at all,
        # which no later stage could use. Theirs with use_threshold=False (BatchTopK) is the one kept.
        logger.warning(
            "%s: the inference threshold was never estimated (-1: a checkpoint saved before their trainer's "
            "threshold_start_step). Their encode() would then keep every positive pre-activation; this crosscoder "
            "encodes as their encode(use_threshold=False) does instead (BatchTopK over each batch, so a code depends "
            "on the rows encoded with it). A checkpoint saved later has its threshold.", weights)
    return model
