"""Import Connor Kissane's crosscoders (``cfg.json`` + ``cc_weights.pt``).

Keys ``W_enc (2, d, m)``, ``W_dec (m, 2, d)``, ``b_enc (m)``, ``b_dec (2, d)``; encode
``relu(einsum(x, W_enc) + b_enc)`` (an L1 crosscoder: sparsity ``relu``), decode
``einsum(f, W_dec) + b_dec``. Their inputs were scaled per model by ``sqrt(d) / E||x||`` and the
factors were not saved: pass them as ``scale_factors`` (base, edited) so that the crosscoder takes
raw activations like every other; without them it expects activations already scaled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from mneme_plugin.crosscoder.config import CrossCoderConfig
from mneme_plugin.crosscoder.imported import ReLUCrossCoder
from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.formats.common import config_int, dtype_name, load_tensors, read_json, require_tensor

logger = logging.getLogger("mneme_plugin")

FORMAT = "kissane"
WEIGHTS_FILE = "cc_weights.pt"
CONFIG_FILE = "cfg.json"
EXPECTED = "a Kissane crosscoder state dict (W_enc (2, d, m), W_dec (m, 2, d), b_enc (m), b_dec (2, d))"


def load_kissane(path: str | Path, scale_factors: Sequence[float] | None = None) -> ReLUCrossCoder:
    path = Path(path)
    folder, weights = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
    cfg: dict[str, Any] = read_json(folder / CONFIG_FILE, "a Kissane crosscoder cfg.json") if (folder / CONFIG_FILE).is_file() else {}
    state = load_tensors(weights, EXPECTED)
    W_enc = require_tensor(state, "W_enc", None, weights, EXPECTED)
    if W_enc.ndim != 3 or W_enc.shape[0] != 2:
        raise CheckpointError(f"{weights}: W_enc has shape {tuple(W_enc.shape)}, expected (2, d, m). {EXPECTED}")
    _, d, m = W_enc.shape
    W_dec = require_tensor(state, "W_dec", (m, 2, d), weights, EXPECTED)
    b_enc = require_tensor(state, "b_enc", (m,), weights, EXPECTED)
    b_dec = require_tensor(state, "b_dec", (2, d), weights, EXPECTED)
    for key, expected in (("d_in", d), ("dict_size", m)):
        if key in cfg and config_int(cfg, key, folder / CONFIG_FILE, f"{expected} ({weights})") != expected:
            raise CheckpointError(f"{folder / CONFIG_FILE}: {key}={cfg[key]} but {weights} implies {expected}.")
    metadata: dict[str, Any] = {"source_format": FORMAT, "source": str(path)}
    for key in ("model_name", "hook_point", "l1_coeff", "dec_init_norm", "enc_dtype"):
        if key in cfg and isinstance(cfg[key], (str, int, float)):
            metadata[key] = cfg[key]
    if isinstance(cfg.get("hook_point"), str):  # a hook name is text (the SAE-Lens export names its folder by it)
        metadata["hook_name"] = cfg["hook_point"]
    if scale_factors is None:
        metadata["scale_factors"] = "not given: the crosscoder expects activations already scaled by sqrt(d)/E||x||"
        logger.warning(
            "%s: Kissane crosscoders do not store their per-model scale factors; without scale_factors the "
            "crosscoder expects activations already multiplied by sqrt(d_model) / E||x|| per model.", path,
        )
    config = CrossCoderConfig(
        activation_dim=d, dict_size=m, k=min(100, m), salience="crosscoder", sparsity="relu",
        dtype=dtype_name(W_enc, weights), metadata=metadata,
    )
    model = ReLUCrossCoder(config)
    with torch.no_grad():
        model.W_enc.copy_(W_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(W_dec.permute(1, 0, 2))
        model.b_dec.copy_(b_dec)
    if scale_factors is not None:
        try:
            model.set_activation_scale(scale_factors)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"scale_factors for {path}: {err} Give the (base, edited) factors "
                              "sqrt(d_model) / E||x|| the crosscoder was trained with (CLI: --scale-factors BASE,EDITED).") from err
    return model
