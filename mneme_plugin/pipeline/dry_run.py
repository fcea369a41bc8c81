"""``mneme run --dry-run``: check a run config without loading any model, and print the plan."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mneme_plugin.activations.models import ModelSpec, check_model_spec
from mneme_plugin.pipeline.config import RunConfig
from mneme_plugin.pipeline.run import plan
from mneme_plugin.pipeline.stages import STAGES, config_problems

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

# (layers, d_model) of common architectures, for checking configs offline when the model's
# config.json is not cached. Matched on a lower-case substring of the model name.
KNOWN_ARCHITECTURES: dict[str, tuple[int, int]] = {
    "zephyr-7b": (32, 4096), "zephyr_rmu": (32, 4096), "mistral-7b": (32, 4096),
    "llama-3-8b": (32, 4096), "llama-3.1-8b": (32, 4096), "llama-3.2-1b": (16, 2048), "llama-3.2-3b": (28, 3072),
    "gemma-2-2b": (26, 2304), "gemma-2-9b": (42, 3584),
    "qwen2.5-0.5b": (24, 896), "qwen2.5-1.5b": (28, 1536), "qwen2.5-3b": (36, 2048), "qwen2.5-7b": (28, 3584),
}


@dataclass
class ConfigCheck:
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    d_model: int | None = None
    n_layers: int | None = None


def _local_hf_config(spec: str) -> dict[str, Any] | None:
    path = Path(spec) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _hub_hf_config(spec: str) -> dict[str, Any] | None:
    """The model's config.json when it is in the local HF cache (no download)."""
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(spec, "config.json", local_files_only=True)).read_text())
    except Exception:
        return None


def _describe_model(which: str, spec: str, check: ConfigCheck) -> None:
    parsed = ModelSpec.parse(spec)
    if check_model_spec(spec, f"models.{which}"):
        return  # reported by config_problems
    if parsed.kind == "organism":
        check.notes.append(f"models.{which}: organism model {parsed.location} found.")
        return
    hf = _local_hf_config(parsed.location) if parsed.kind == "local" else None
    where = "local folder"
    if hf is None:
        hf, where = _hub_hf_config(spec), "hub (cached)"
    if hf is None:
        known = next((v for k, v in KNOWN_ARCHITECTURES.items() if k in spec.lower()), None)
        if known is None:
            check.notes.append(f"models.{which}: {spec}: hub name, not in the local cache; its size is unknown until download.")
            return
        hf, where = {"num_hidden_layers": known[0], "hidden_size": known[1], "model_type": "known architecture"}, "hub"
    d = hf.get("hidden_size") or hf.get("d_model") or hf.get("n_embd")
    layers = hf.get("num_hidden_layers") or hf.get("n_layer") or hf.get("n_layers")
    check.notes.append(f"models.{which}: {spec} ({where}): {hf.get('model_type', '?')}, d_model {d}, {layers} layers.")
    for name, value in (("d_model", d), ("n_layers", layers)):
        known = getattr(check, name)
        if value is not None and known is not None and value != known:
            check.problems.append(f"models.base and models.edited differ in {name} ({known} vs {value}).")
        elif value is not None:
            setattr(check, name, value)


def check_config(config: RunConfig) -> ConfigCheck:
    """Models and corpus named and findable, layer in range where the architecture is known,
    disk and memory estimates."""
    check = ConfigCheck()
    for which in ("base", "edited"):
        _describe_model(which, getattr(config.models, which), check)
    check.problems += config_problems(config)
    source = config.corpus.source
    if source.startswith("hf:"):
        check.notes.append(f"corpus: Hugging Face dataset {source[3:]} (streamed).")
    elif Path(source).is_file():
        check.notes.append(f"corpus: local file {source} ({Path(source).stat().st_size / 2**20:.1f} MiB).")
    h = config.harvest
    if check.n_layers is not None and h.layer >= check.n_layers:
        check.problems.append(f"harvest.layer {h.layer} is out of range: the models have {check.n_layers} layers "
                              f"(0..{check.n_layers - 1}).")
    if check.d_model is not None:
        d = check.d_model
        cc = config.crosscoder.resolve(d)
        if config.training.stream:
            check.notes.append("disk: training.stream is set: activations are harvested on the fly, no store is written.")
        elif h.max_tokens:
            disk = h.max_tokens * 2 * d * BYTES[h.dtype]
            check.notes.append(f"disk: about {disk / 2**30:.2f} GiB of activations for {h.max_tokens:,} tokens ({h.dtype}).")
            free = shutil.disk_usage(Path(config.run_dir).resolve().anchor).free
            if disk > free:
                check.problems.append(f"disk: the store needs {disk / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB are free; "
                                      "lower harvest.max_tokens or set training.stream: true (train while harvesting, "
                                      "no store on disk).")
        else:
            check.notes.append("disk: harvest.max_tokens is not set: the whole corpus is harvested.")
        params = 2 * (2 * d * cc.dict_size) + cc.dict_size + 2 * d
        memory = params * BYTES[cc.dtype] * 4 + config.training.batch_size * cc.dict_size * 4 * 3
        check.notes.append(f"training memory: about {memory / 2**30:.2f} GiB (crosscoder {params / 1e6:.1f}M parameters, "
                           f"Adam state, batch {config.training.batch_size}).")
    return check


def format_plan(config: RunConfig, check: ConfigCheck) -> str:
    lines = [f"Run directory: {config.run_dir}", "", "Checks:"]
    lines += [f"  ok   {n}" for n in check.notes]
    lines += [f"  FAIL {p}" for p in check.problems]
    lines += ["", "Plan:"]
    for stage, fingerprint, status in plan(config, STAGES):
        lines.append(f"  {stage.name:<10} {status:<24} config {fingerprint}")
    lines.append("")
    lines.append("The config has problems (FAIL above)." if check.problems else "The config looks runnable.")
    return "\n".join(lines)
