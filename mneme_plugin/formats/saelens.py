"""Export a crosscoder as SAE-Lens ``jumprelu`` SAEs, and read those exports back.

The main export is one SAE with ``d_in = 2 d`` over ``concat(base, edited)`` raw activations
(``x.reshape(B, 2 d)`` of our stacked (B, 2, d) input). Everything our ``encode`` does is folded in:

* normalisation: W_enc'^l = s_l W_enc^l, b_enc' = b_enc - sum_l s_l mu_l W_enc^l (mu = 0 unless
  normalization ``mean_scale``); decoder W_dec'^l = W_dec^l / s_l, b_dec'^l = b_dec^l / s_l + mu_l
  (s_l + 1e-8 for ``mean_scale``), so SAE-Lens reconstructs raw activations;
* salience and threshold: f_j = pre_j (pre_j w_j > t) = pre_j (pre_j > t / w_j), so the jumprelu
  threshold is t / w_j (+inf where w_j = 0); ``relu`` crosscoders get 0, ``jumprelu`` their own.

SAE-Lens computes ``relu(x W_enc + b_enc) * (x W_enc + b_enc > threshold)`` with
``apply_b_dec_to_input`` false: the same codes as our ``encode``. A DECOUPLED crosscoder exports
2 m latents: latent ``l * m + j`` is latent j as gated for model l, decoding into model l only.

Optional per-model views (``d_in = d``, one model's half) are marked ``partial``: their encoder sees
one model only (the other's normalised input is taken as 0, i.e. its mean), so their codes differ.

Layout (folder per hook, what ``SAE.from_pretrained("org/repo", "<folder>")`` loads once pushed)::

    OUT/<folder>/            cfg.json + sae_weights.safetensors   (concat, the exact one)
    OUT/<folder>__base/      per-model view (partial), with views=True
    OUT/<folder>__edited/

Writing needs only JSON and safetensors; sae_lens is never imported.
"""

from __future__ import annotations

import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mneme_plugin.activations.config import DEFAULT_HOOK_TEMPLATE
from mneme_plugin.crosscoder.config import CrossCoderConfig
from mneme_plugin.crosscoder.base import CrossCoder, weights_problem
from mneme_plugin.crosscoder.imported import JumpReLUCrossCoder
from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.formats.common import config_int, load_tensors, read_json, require_tensor
from mneme_plugin.files import atomic_write, atomic_write_text, refuse_overwrite

logger = logging.getLogger("mneme_plugin")

FORMAT = "mneme-crosscoder-saelens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
VIEW_SUFFIX = {"base": "__base", "edited": "__edited"}
MODEL_ORDER = ("base", "edited")


def _sae_lens_version() -> str:
    """The installed SAE-Lens version if >= 6 (read from package metadata, no import), else 6.0.0."""
    try:
        installed = version("sae-lens")
    except PackageNotFoundError:
        return "6.0.0"
    try:
        return installed if int(installed.split(".")[0]) >= 6 else "6.0.0"
    except ValueError:
        return "6.0.0"


@torch.no_grad()
def folded_weights(cc: CrossCoder) -> dict[str, torch.Tensor]:
    """Float64 folded tensors of the concat SAE: W_enc (2d, m'), b_enc, W_dec (m', 2d), b_dec (2d,), threshold.

    Generic over architectures: the normaliser's affine map (``normalizer.affine``) is folded into the
    weights and the sparsity rule becomes the crosscoder's ``jumprelu_thresholds``; an architecture with
    a code per model (no ``shared_code``) gets 2 m latents, latent ``l * m + j`` decoding into model l only.
    """
    n, d, m = cc.W_enc.shape
    f64 = torch.float64
    mu, s, denorm = cc.normalizer.affine(cc)
    W_enc = cc.W_enc.detach().cpu().to(f64) * s[:, None, None]  # (2, d, m)
    b_enc = cc.b_enc.detach().cpu().to(f64) - torch.einsum("ld,ldm->m", mu, W_enc)
    W_dec = cc.W_dec.detach().cpu().to(f64) / denorm[:, None, None]  # (2, m, d)
    b_dec = cc.b_dec.detach().cpu().to(f64) / denorm[:, None] + mu  # (2, d)
    threshold = cc.jumprelu_thresholds()
    if not cc.shared_code:
        zero = torch.zeros(m, d, dtype=f64)
        return {
            "W_enc": torch.cat([W_enc.reshape(n * d, m)] * 2, dim=1),
            "b_enc": torch.cat([b_enc, b_enc]),
            "W_dec": torch.cat([torch.cat([W_dec[0], zero], dim=1), torch.cat([zero, W_dec[1]], dim=1)], dim=0),
            "b_dec": b_dec.reshape(n * d),
            "threshold": threshold.reshape(n * m),
        }
    return {
        "W_enc": W_enc.reshape(n * d, m),
        "b_enc": b_enc,
        "W_dec": W_dec.permute(1, 0, 2).reshape(m, n * d),
        "b_dec": b_dec.reshape(n * d),
        "threshold": threshold,
    }


def _view(full: dict[str, torch.Tensor], mu: torch.Tensor, layer: int, d: int, decoupled: bool) -> dict[str, torch.Tensor]:
    """One model's half: encoder rows and decoder columns of that model, the other model's input at its
    mean ``mu`` (its normalised input 0): the folded ``b_enc`` holds every model's mean term, so the other
    model's is added back (it subtracts mu_other W_enc'^other, which a raw input of 0 would leave there)."""
    cols = slice(layer * d, (layer + 1) * d)
    b_enc = full["b_enc"].clone()
    for other in range(mu.shape[0]):
        if other != layer:
            b_enc += mu[other] @ full["W_enc"][other * d:(other + 1) * d]
    if decoupled:  # keep the latents gated for this model: (m,) of the 2m
        m = full["b_enc"].numel() // 2
        lat = slice(layer * m, (layer + 1) * m)
        return {"W_enc": full["W_enc"][cols, lat], "b_enc": b_enc[lat], "W_dec": full["W_dec"][lat, cols],
                "b_dec": full["b_dec"][cols], "threshold": full["threshold"][lat]}
    return {"W_enc": full["W_enc"][cols], "b_enc": b_enc, "W_dec": full["W_dec"][:, cols],
            "b_dec": full["b_dec"][cols], "threshold": full["threshold"]}


def _write(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any], dtype: torch.dtype) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(out, str(tmp)))
    atomic_write_text(folder / CFG_FILE, json.dumps(cfg, indent=2))


def export_saelens(
    crosscoder: CrossCoder,
    out_dir: str | os.PathLike[str],
    *,
    folder: str | None = None,
    hook_name: str | None = None,
    base_model: str | None = None,
    edited_model: str | None = None,
    views: bool = False,
    force: bool = False,
) -> dict[str, Path]:
    """Write the crosscoder as SAE-Lens jumprelu SAE folders under ``out_dir``; returns {view: folder}.

    ``folder`` defaults to the hook name: ``hook_name``, else the crosscoder's recorded hook, else
    ``blocks.{layer}.hook_resid_post`` of its recorded layer, else ``crosscoder``.
    ``views`` adds the per-model (partial) views. Existing files are refused (OutputExistsError)
    unless ``force``.
    """
    cfg: CrossCoderConfig = crosscoder.cfg
    meta = dict(cfg.metadata)
    hook_name = hook_name or meta.get("hook_name")
    if hook_name is None and meta.get("layer") is not None:
        # An imported crosscoder records its layer only (science-of-finetuning: the residual stream after it).
        hook_name = DEFAULT_HOOK_TEMPLATE.format(layer=int(meta["layer"]))
        logger.info("The crosscoder records layer %s and no hook: exported as %s (pass hook_name= otherwise).",
                    meta["layer"], hook_name)
    base_model = base_model or meta.get("base_model") or meta.get("lm_name") or meta.get("model_name")
    edited_model = edited_model or meta.get("edited_model") or meta.get("chat_model")
    if hook_name is not None and not isinstance(hook_name, str):
        raise ConfigError(f"The crosscoder records hook_name {hook_name!r}, not a hook point name; pass hook_name= "
                          "(CLI --hook) to name it.")
    folder = folder or hook_name or "crosscoder"
    if "/" in folder or folder in ("", ".", ".."):
        raise ConfigError(f"The export folder name must be one path component, got {folder!r}.")
    names = [folder] + ([folder + VIEW_SUFFIX[v] for v in MODEL_ORDER] if views else [])
    # Per-model views an earlier export left beside this folder describe that crosscoder, not this one: they go
    # with the concat SAE they were cut from (refused without force like it, removed with it).
    stale = [] if views else [Path(out_dir) / (folder + VIEW_SUFFIX[v]) for v in MODEL_ORDER
                              if _is_exported_view(Path(out_dir) / (folder + VIEW_SUFFIX[v]))]
    refuse_overwrite([Path(out_dir) / n / f for n in names for f in (CFG_FILE, WEIGHTS_FILE)]
                     + [view / f for view in stale for f in (CFG_FILE, WEIGHTS_FILE)], force)
    d, m = crosscoder.activation_dim, crosscoder.dict_size
    decoupled = not crosscoder.shared_code
    full = folded_weights(crosscoder)
    mu = crosscoder.normalizer.affine(crosscoder)[0]  # the views add back the other model's mean term
    dtype = getattr(torch, cfg.dtype)
    sae_version = _sae_lens_version()
    mneme_meta = {
        "format": FORMAT,
        "crosscoder_config": {k: v for k, v in cfg.to_dict().items() if k != "metadata"},
        "crosscoder_metadata": meta,
        # What the folding used, so our reader can undo it: the crosscoder back in its normalised space
        # (decoder norms per model, hence attribution, as before the export).
        "normalization": {"activation_scale": crosscoder.activation_scale.detach().cpu().tolist(),
                          **{name: getattr(crosscoder, name).detach().cpu().tolist()
                             for name in crosscoder.normalizer.buffers}},
        "latent_layout": (
            f"decoupled: latent l*{m}+j is latent j as gated for model l (0 base, 1 edited)" if decoupled
            else "one latent per crosscoder latent"
        ),
    }
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    for view in ("concat",) + (MODEL_ORDER if views else ()):
        if view == "concat":
            tensors, d_in, name = full, 2 * d, folder
            layout = "concat(base, edited): x[..., :d] base activations, x[..., d:] edited activations (raw)"
            partial = False
        else:
            layer = MODEL_ORDER.index(view)
            tensors, d_in, name = _view(full, mu, layer, d, decoupled), d, folder + VIEW_SUFFIX[view]
            layout = f"{view} activations only (raw)"
            partial = True
        model_name = edited_model if view == "edited" else base_model
        metadata: dict[str, Any] = {
            "sae_lens_version": sae_version,
            "sae_lens_training_version": None,
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": meta.get("context_length"),
            "model_names": {"base": base_model, "edited": edited_model},
            "model_order": list(MODEL_ORDER),
            "layout": layout,
            "view": view,
            "partial": partial,
            "salience": cfg.salience,
            "mneme": mneme_meta,
        }
        if partial:
            metadata["partial_note"] = (
                f"Encoder sees the {view} model only (the other model's normalised input is taken as 0): its codes "
                "differ from the crosscoder's; use the concat SAE for exact codes."
            )
        sae_cfg = {
            "architecture": "jumprelu",
            "d_in": d_in,
            "d_sae": int(tensors["b_enc"].numel()),
            "dtype": cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": metadata,
        }
        _write(out_dir / name, tensors, sae_cfg, dtype)
        written[view] = out_dir / name
    for view_folder in stale:
        for f in (CFG_FILE, WEIGHTS_FILE):
            (view_folder / f).unlink(missing_ok=True)
        if not any(view_folder.iterdir()):
            view_folder.rmdir()
        logger.info("Removed %s: a per-model view of the crosscoder exported there before (views=True adds this "
                    "one's).", view_folder)
    return written


def _is_exported_view(folder: Path) -> bool:
    """Whether ``folder`` holds a per-model view written by ``export_saelens`` (never raises)."""
    try:
        meta = json.loads((folder / CFG_FILE).read_text()).get("metadata") or {}
        return bool(meta.get("partial")) and (meta.get("mneme") or {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_saelens_folder(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_saelens_export(path: str | Path) -> JumpReLUCrossCoder:
    """A crosscoder (sparsity ``jumprelu``) from a concat SAE-Lens folder written by ``export_saelens``: back in
    its normalised space with its scale factors where the export records them (exports of earlier
    versions: in raw space, scale 1; the same codes, but per-model decoder norms scaled by 1 / s_l)."""
    path = Path(path)
    cfg_path = path / CFG_FILE
    cfg = read_json(cfg_path, "an SAE-Lens cfg.json")
    meta = cfg.get("metadata") or {}
    mneme = meta.get("mneme") if isinstance(meta, dict) else None
    if not isinstance(mneme, dict) or mneme.get("format") != FORMAT:
        raise CheckpointError(
            f"{cfg_path} is an SAE-Lens SAE config but not a crosscoder exported by mneme (no metadata.mneme.format "
            f"== {FORMAT!r}); plain SAEs cannot be read as crosscoders."
        )
    if meta.get("partial"):
        raise CheckpointError(
            f"{path} is a per-model ({meta.get('view')}) view, which sees one model only; import the concat export."
        )
    if cfg.get("architecture") != "jumprelu" or cfg.get("apply_b_dec_to_input", True):
        raise CheckpointError(f"{cfg_path}: expected architecture 'jumprelu' with apply_b_dec_to_input false.")
    d_in = config_int(cfg, "d_in", cfg_path, "the SAE's input width (2 d for a concat export)")
    m = config_int(cfg, "d_sae", cfg_path, "the number of SAE latents")
    for key in ("crosscoder_config", "crosscoder_metadata", "normalization"):
        if mneme.get(key) is not None and not isinstance(mneme[key], dict):
            raise CheckpointError(f"{cfg_path}: metadata.mneme.{key} is a {type(mneme[key]).__name__}, expected a "
                                  "mapping. The file was edited or damaged; export the crosscoder again.")
    if d_in % 2:
        raise CheckpointError(f"{cfg_path}: d_in={d_in} is not 2 d for a concat(base, edited) export.")
    d = d_in // 2
    weights = path / WEIGHTS_FILE
    expected = f"a jumprelu SAE (W_enc ({d_in}, {m}), b_enc, W_dec ({m}, {d_in}), b_dec, threshold)"
    tensors = load_tensors(weights, expected)
    W_enc = require_tensor(tensors, "W_enc", (d_in, m), weights, expected)
    W_dec = require_tensor(tensors, "W_dec", (m, d_in), weights, expected)
    b_enc = require_tensor(tensors, "b_enc", (m,), weights, expected)
    b_dec = require_tensor(tensors, "b_dec", (d_in,), weights, expected)
    thr = require_tensor(tensors, "threshold", (m,), weights, expected)
    original = dict(mneme.get("crosscoder_config") or {})
    salience = original.get("salience", "paper")
    k = min(config_int(original, "k", cfg_path, "metadata.mneme.crosscoder_config.k, the crosscoder's k", 100), m)
    folding = mneme.get("normalization")  # exports before this field stay in raw space (scale 1)
    normalization = original.get("normalization", "scale") if isinstance(folding, dict) else "scale"
    try:
        config = CrossCoderConfig(
            activation_dim=d, dict_size=m, k=k, salience="paper" if salience == "decoupled" else salience,
            sparsity="jumprelu", dtype=str(cfg.get("dtype", "float32")), normalization=normalization,
            metadata={**(mneme.get("crosscoder_metadata") or {}), "source_format": FORMAT, "source": str(path),
                      "exported_salience": salience},
        )
    except ConfigError as err:
        raise CheckpointError(f"{cfg_path} describes no valid crosscoder: {err} Export the crosscoder again.") from err
    model = JumpReLUCrossCoder(config)
    if isinstance(folding, dict):
        missing = [name for name in ("activation_scale", *model.normalizer.buffers) if name not in folding]
        if missing:
            raise CheckpointError(f"{cfg_path}: metadata.mneme.normalization lacks {missing}, which the export "
                                  "folded into the weights. The file was edited or damaged; export the crosscoder again.")
    W_enc, W_dec = W_enc.double().reshape(2, d, m), W_dec.double().reshape(m, 2, d).permute(1, 0, 2)
    b_enc, b_dec = b_enc.double(), b_dec.double().reshape(2, d)
    with torch.no_grad():
        if isinstance(folding, dict):
            # Undo ``folded_weights``: W_enc' = s W_enc, b_enc' = b_enc - mu.W_enc', W_dec' = W_dec / s',
            # b_dec' = b_dec / s' + mu (the normaliser's affine map, from the recorded buffers).
            try:
                model.set_activation_scale(folding["activation_scale"])
                for name in model.normalizer.buffers:
                    getattr(model, name).copy_(torch.tensor(folding[name]))
            except (ValueError, TypeError, RuntimeError) as err:
                raise CheckpointError(f"{cfg_path}: metadata.mneme.normalization does not fit a crosscoder over 2 "
                                      f"models of width {d} ({err}). The file was edited or damaged; export the "
                                      "crosscoder again.") from err
            for name in model.normalizer.buffers:
                problem = weights_problem(name, getattr(model, name))
                if problem:
                    raise CheckpointError(f"{cfg_path}: metadata.mneme.normalization: {problem}. The file was edited "
                                          "or damaged; export the crosscoder again.")
            mu, scale, denorm = model.normalizer.affine(model)
            b_enc = b_enc + torch.einsum("ld,ldm->m", mu, W_enc)
            W_enc = W_enc / scale[:, None, None]
            W_dec = W_dec * denorm[:, None, None]
            b_dec = (b_dec - mu) * denorm[:, None]
        model.W_enc.copy_(W_enc)
        model.b_enc.copy_(b_enc)
        model.W_dec.copy_(W_dec)
        model.b_dec.copy_(b_dec)
        model.latent_threshold.copy_(thr)
    return model
