"""``mneme run --dry-run``: check a run config without loading any model, and print the plan."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mneme_plugin.activations.models import ModelSpec, check_model_spec, same_model
from mneme_plugin.pipeline.config import RunConfig
from mneme_plugin.pipeline.run import check_only, plan
from mneme_plugin.pipeline.stages import STAGES, config_problems, missing_inputs, relative_paths_note

if TYPE_CHECKING:
    from mneme_plugin.groundtruth.harness import LMEvalConfig

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

# (layers, d_model) of common architectures, for checking configs offline when the model's
# config.json is not cached. Matched on a lower-case substring of the model name.
KNOWN_ARCHITECTURES: dict[str, tuple[int, int]] = {
    "zephyr-7b": (32, 4096), "zephyr_rmu": (32, 4096), "mistral-7b": (32, 4096),
    "llama-3-8b": (32, 4096), "llama-3.1-8b": (32, 4096), "llama-3.2-1b": (16, 2048), "llama-3.2-3b": (28, 3072),
    "gemma-2-2b": (26, 2304), "gemma-2-9b": (42, 3584),
    "qwen2.5-0.5b": (24, 896), "qwen2.5-1.5b": (28, 1536), "qwen2.5-3b": (36, 2048), "qwen2.5-7b": (28, 3584),
    "qwen2.5-coder-7b": (28, 3584), "qwen2.5-coder-32b": (64, 5120), "llama-2-7b": (32, 4096),
    "llama-2-13b": (40, 5120),
}

# Hub models and data sets that need an access request (or a manual download) before a run can use them.
GATED: dict[str, str] = {
    "meta-llama/": "request access on the model's Hugging Face page and `huggingface-cli login`",
    "cais/wmdp-bio-forget-corpus": "request access at https://huggingface.co/datasets/cais/wmdp-bio-forget-corpus",
    "lmsys/lmsys-chat-1m": "accept the licence at https://huggingface.co/datasets/lmsys/lmsys-chat-1m",
    "HEx-PHI": "request access at https://huggingface.co/datasets/LLM-Tuning-Safety/HEx-PHI",
}

# Rough throughput of one H100-class GPU in bf16 (sustained FLOP/s) and questions per lm-eval group,
# for the dry run's time estimates (orders of magnitude, not promises).
GPU_FLOPS = 3e14
LM_EVAL_QUESTIONS = {"mmlu": 14_042, "mmlu_pro": 12_032, "wmdp": 3_668, "wmdp_bio": 1_273, "wmdp_chem": 408,
                     "wmdp_cyber": 1_987}


@dataclass
class ConfigCheck:
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    d_model: int | None = None
    n_layers: int | None = None
    estimates: list[str] = field(default_factory=list)
    to_fetch: list[str] = field(default_factory=list)
    gated: list[str] = field(default_factory=list)


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


def _describe_model(which: str, spec: str, check: ConfigCheck, config: RunConfig | None = None) -> None:
    if config is not None and which == "edited" and config.intervention is not None:
        iv = config.intervention
        check.notes.append(f"models.edited: written by the intervention stage ({iv.kind}"
                           + (f", preset {iv.preset}" if iv.preset else "") + f") from models.base into "
                           f"{config.layout.edited_model}.")
        return
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
        _describe_model(which, getattr(config.models, which), check, config)
    if config.intervention is None and same_model(config.models.base, config.models.edited):
        check.warnings.append(f"models.base and models.edited are the same model ({config.models.base}): a "
                              "crosscoder finds no difference between a model and itself.")
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
            if disk > 0.5 * free:
                check.notes.append("disk: the store would take over half of the free disk: consider "
                                   "training.stream: true (train while harvesting, no store on disk).")
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
    check.gated = gated_inputs(config)
    check.to_fetch = missing_inputs(config)
    check.estimates = estimates(config, check)
    return check


def gated_inputs(config: RunConfig) -> list[str]:
    """The gated models and data sets the config names, with how to get access."""
    named = config.to_dict()
    if config.intervention is not None:  # the preset's data sets too
        named["intervention"] = config.intervention.resolved(config.models.base).to_dict()
    text = json.dumps(named, default=str)
    gated = []
    for name, how in GATED.items():
        # An organisation's prefix names the models that matched (the explainer's too, not only base / edited).
        found = sorted(set(re.findall(re.escape(name) + r"[\w.\-]+", text, flags=re.IGNORECASE))) if name.endswith("/") else []
        if found or name.lower() in text.lower():
            gated.append(f"{name}{' (' + ', '.join(found) + ')' if found else ''}: {how}")
    return gated


def _params(check: ConfigCheck) -> float | None:
    """Approximate transformer parameters from (layers, d_model): 12 L d^2 plus a 128k x d embedding."""
    if check.d_model is None or check.n_layers is None:
        return None
    return 12 * check.n_layers * check.d_model**2 + 2 * 128_000 * check.d_model


def _duration(seconds: float) -> str:
    if seconds < 60:  # not "0 min"
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _checkpoint_note(kind: str, settings: Any, params: float, d_model: int | None) -> str:
    """The size of the intervention's checkpoint while it trains: the trained parameters and their two
    AdamW moments (bf16), or nothing where the trained part is small (LoRA) or unknown."""
    if not getattr(settings, "checkpoint_every", 0):
        return ""
    if kind == "rmu" and settings.param_names is None and d_model is not None:
        trained = len(settings.layer_ids) * 8 / 3 * d_model**2  # one MLP projection (d x ~8d/3) per layer
    elif kind == "sft" and settings.lora is None:
        trained = params
    else:
        return ""
    return (f"; while it trains, a checkpoint of ~{max(trained * 3 * 2 / 2**30, 0.1):.1f} GiB in edited_model/ "
            "(removed when the model is written)")


def _sft_examples(settings: Any) -> int | None:
    """How many examples SFT trains on: a local JSONL file's lines (at most ``max_examples``); else
    ``max_examples``; None when unknown (a hub dataset, another file type, a file not there yet)."""
    data = Path(settings.data)
    lines = sum(1 for line in data.open() if line.strip()) if data.suffix == ".jsonl" and data.is_file() else None
    if lines is None:
        return settings.max_examples
    return lines if settings.max_examples is None else min(lines, settings.max_examples)


def _lm_eval_questions(config: LMEvalConfig) -> int:
    """About how many questions lm-eval asks each model for ``config`` (an ``LMEvalConfig``): the known
    benchmarks' sizes (1,000 for another task), cut by ``limit``, which lm-eval applies per task: a group
    with ``limit: 50`` asks 50 per task it runs (MMLU-Pro's 14: 700), counted from lm-eval's task index."""
    from mneme_plugin.groundtruth.harness import planned_tasks

    total = 0
    for name in config.tasks:
        full = LM_EVAL_QUESTIONS.get(name, 1000)
        if config.limit is None:
            total += full
        elif config.limit < 1:
            total += int(full * config.limit)
        else:
            try:  # offline, cached per process (the dry run's task checks built it)
                leaves = planned_tasks(config.replace(tasks=[name]))
            except ImportError:
                leaves = None
            total += min(full, int(config.limit) * len(leaves or [name]))
    return total


def estimates(config: RunConfig, check: ConfigCheck) -> list[str]:
    """Rough time and disk per step on one H100-class GPU (from the architecture; none when it is unknown)."""
    params = _params(check)
    if params is None:
        return []
    out = []
    forward = 2 * params  # FLOPs per token of one forward pass
    iv = config.intervention
    if iv is not None:
        settings = iv.resolved("")
        if iv.kind == "rmu":
            tokens = settings.max_num_batches * settings.batch_size * 2 * max(settings.per_topic("forget_max_length", 1))
            seconds = tokens * forward * 4 / GPU_FLOPS  # updated + frozen forwards, backward
        else:
            examples = _sft_examples(settings)
            per = examples or 10_000
            seconds = settings.epochs * per * settings.max_length / 2 * forward * 3 / GPU_FLOPS
        if iv.kind == "rmu" or examples:
            timing = f"~{_duration(seconds)}"
        elif not settings.data.startswith("hf:") and not Path(settings.data).exists():
            # No examples to count yet: the rate alone, said as one (a 10-example file takes minutes).
            timing = (f"time unknown until {settings.data} exists (~{_duration(seconds)} per 10k examples, "
                      f"{settings.epochs} epoch(s))")
        else:
            timing = f"~{_duration(seconds)} per 10k examples ({settings.epochs} epoch(s))"
        out.append(f"intervention ({iv.kind}): {timing}"
                   + f"; edited model {params * 2 / 2**30:.0f} GiB (bf16)"
                   + _checkpoint_note(iv.kind, settings, params, check.d_model))
    for name, table in config.ground_truth.tables.items():
        if table.lm_eval is not None:
            questions = _lm_eval_questions(table.lm_eval)
            generative = any(t.startswith("mmlu_pro") for t in table.lm_eval.tasks)
            tokens = questions * (2_500 if generative else 700)  # 5-shot CoT prompt + generation vs. 0-shot choices
            out.append(f"ground_truth {name} (lm-eval, {questions:,} questions x 2 models): "
                       f"~{_duration(2 * tokens * forward / GPU_FLOPS * (20 if generative else 1))}")
        elif table.judge is not None:
            answers = table.judge.samples_per_question * 2
            out.append(f"ground_truth {name} (judge): {answers} answers per question (both models) of up to "
                       f"{table.judge.generator.max_new_tokens} tokens, plus judge API calls; minutes with vLLM")
    h = config.harvest
    if h.max_tokens:
        harvest_time = _duration(2 * h.max_tokens * forward / GPU_FLOPS * 3)
        out.append(f"harvest: ~{harvest_time} for {h.max_tokens:,} tokens through both models"
                   # Streaming keeps no store: attribute harvests the same tokens again.
                   + (f", twice with training.stream (in train, then ~{harvest_time} again in attribute)"
                      if config.training.stream else ""))
    cc = config.crosscoder.resolve(int(check.d_model or 0))
    t = config.training
    train_flops = t.steps * t.batch_size * 6 * 2 * 2 * int(check.d_model or 0) * cc.dict_size
    out.append(f"train: ~{_duration(train_flops / GPU_FLOPS * 3)} ({t.steps:,} steps of {t.batch_size:,} rows, "
               f"{cc.dict_size:,} latents)")
    llm = [name for name, uses in (("explain", config.explain.explainer != "offline"),
                                   ("map", config.map.method == "llm" or config.map.labeler == "llm")) if uses]
    calls = (f"; {' and '.join(llm)} call{'s' if len(llm) == 1 else ''} the LLM client once per collected latent"
             if llm else "; explain and map run offline (no LLM call)")
    out.append(f"collect / explain / map: collect reads {config.collect.harvest.max_tokens if config.collect.harvest and config.collect.harvest.max_tokens else 'the corpus'} "
               f"tokens{calls}")
    return out


def format_plan(config: RunConfig, check: ConfigCheck, only: list[str] | None = None) -> str:
    """The checks and the plan; with ``only`` (``mneme run --only``), the other stages read "not selected"."""
    check_only(only, STAGES)
    lines = [f"Run directory: {config.run_dir}", "", "Checks:"]
    lines += [f"  ok   {n}" for n in check.notes]
    lines += [f"  WARN {w}" for w in check.warnings]
    lines += [f"  FAIL {p}" for p in check.problems]
    if check.to_fetch:
        lines += ["", "Data to fetch before running (`mneme run` refuses to start without it):"]
        lines += [f"  {m}" for m in check.to_fetch]
    if check.gated:
        lines += ["", "Gated models / data sets (get access before running):"] + [f"  {g}" for g in check.gated]
    if check.estimates:
        lines += ["", "Estimates (one H100-class GPU, rough):"] + [f"  {e}" for e in check.estimates]
    lines += ["", "Plan:"]
    for stage, fingerprint, status in plan(config, STAGES):
        if only and stage.name not in only and status != "disabled":
            status = "not selected (--only)"
        lines.append(f"  {stage.name:<10} {status:<24} config {fingerprint}")
    lines.append("")
    lines.append("The config has problems (FAIL above)." if check.problems else "The config looks runnable.")
    if check.problems or check.to_fetch:
        lines.append(relative_paths_note())
    return "\n".join(lines)
