"""Hugging Face causal LMs for the interventions: loading, decoder layers, parameters by name, and
the output folder (weights, config, tokenizer, the exact intervention config and a training log).

Heavy imports (torch, transformers) happen inside the functions: ``import mneme_plugin`` stays fast.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mneme_plugin.devices import resolve_device
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_directory

if TYPE_CHECKING:
    import torch

INTERVENTION_CONFIG = "mneme_intervention.yaml"
TRAINING_LOG = "training_log.jsonl"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}.")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before
    (older versions would silently ignore an unknown ``dtype``)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_causal_lm(name_or_path: str, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a HF causal LM (hub name or local folder), in eval mode on ``device``.

    A tokenizer without a pad token gets its EOS as pad (batches are right-padded and masked).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not name_or_path:
        raise ConfigError("No model given: set `model` to a Hugging Face model name or a local model folder.")
    from mneme_plugin.interventions.checkpoints import unfinished

    if unfinished(name_or_path):
        raise ConfigError(f"{name_or_path} holds an unfinished intervention (checkpoints only, no model yet): run the "
                          "intervention again to resume and finish it.")
    from mneme_plugin.activations.models import hub_cache_when_unreachable, require_hub_model

    require_hub_model(name_or_path, "model")
    with hub_cache_when_unreachable(name_or_path):
        try:
            hf_config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{name_or_path} is not a Hugging Face model folder or hub name: {err}") from err
        try:
            AutoModelForCausalLM._model_mapping[type(hf_config)]
        except KeyError as err:
            raise ConfigError(
                f"{name_or_path} is a {type(hf_config).__name__} ({hf_config.model_type}), not a causal language model; "
                "interventions need a decoder-only LM (Llama, Mistral, Qwen2, ...)."
            ) from err
        dev = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **{_dtype_keyword(): resolve_dtype(dtype, dev)}).to(dev)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder blocks (``model.model.layers`` for Llama / Mistral / Qwen2)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"Cannot find the decoder layers of {type(model).__name__} (expected model.model.layers).")
    return layers


def parameters_by_name(model: Any, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The parameters named ``names``: each a full name or a unique dotted suffix of one
    (``layers.5.mlp.down_proj.weight`` matches ``model.layers.5.mlp.down_proj.weight``)."""
    params = dict(model.named_parameters())
    chosen: dict[str, torch.nn.Parameter] = {}
    for name in names:
        matches = [full for full in params if full == name or full.endswith("." + name)]
        if not matches:
            close = difflib.get_close_matches(name, list(params), n=3, cutoff=0.5)
            raise ConfigError(f"No parameter named {name!r} in {type(model).__name__}"
                              + (f"; close names: {close}." if close else f"; e.g. {list(params)[:3]}."))
        if len(matches) > 1:
            raise ConfigError(f"Parameter name {name!r} is ambiguous: it matches {matches[:5]}; give the full name.")
        chosen[matches[0]] = params[matches[0]]
    return chosen


@dataclass
class InterventionResult:
    """An edited model with what produced it: the config and one log record per optimiser step."""

    model: Any
    tokenizer: Any
    config: Any
    log: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def save_intervention(result: InterventionResult, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the edited model as a HF folder (``save_pretrained``: weights, config, tokenizer) plus
    ``mneme_intervention.yaml`` (the exact config) and ``training_log.jsonl``, atomically."""

    def write(tmp: Path) -> None:
        result.model.save_pretrained(tmp)
        result.tokenizer.save_pretrained(tmp)
        record = {"kind": type(result.config).__name__, "config": result.config.to_dict()}
        (tmp / INTERVENTION_CONFIG).write_text(yaml.safe_dump(record, sort_keys=False))
        (tmp / TRAINING_LOG).write_text("".join(json.dumps(r) + "\n" for r in result.log))

    try:
        # Durable: renaming it into place removes the checkpoints that could redo it.
        return atomic_directory(out_dir, write, overwrite=overwrite, durable=True)
    except FileExistsError as err:
        raise ConfigError(f"{err} (--overwrite replaces it).") from err


def load_training_log(model_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(model_dir) / TRAINING_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
