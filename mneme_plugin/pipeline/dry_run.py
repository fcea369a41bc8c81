"""``mneme run --dry-run``: check a run config without loading any model, and print the plan."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mneme_plugin.activations.models import ModelSpec, check_model_spec, same_model
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import data_file_rows, nearest_existing, size_text
from mneme_plugin.layout import RunLayout
from mneme_plugin.pipeline.config import RunConfig
from mneme_plugin.pipeline.run import (
    check_batch_shared, check_only, pending_outputs, plan, stale_outside_only, switched_off, unselected_inputs,
)
from mneme_plugin.pipeline.stages import (
    STAGES, client_problems, config_problems, hub_model_problems, missing_inputs, relative_paths_note,
)

if TYPE_CHECKING:
    from mneme_plugin.groundtruth.harness import LMEvalConfig
    from mneme_plugin.pipeline.stage import Stage

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

# The config.json fields that size common architectures, for checking configs and sizing downloads offline
# when the model's config.json is not cached. Matched on a lower-case substring of the model name.
def _llama_like(layers: int, d: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tied: bool,
                **extra: Any) -> dict[str, Any]:
    return {"num_hidden_layers": layers, "hidden_size": d, "intermediate_size": intermediate,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "tie_word_embeddings": tied, "torch_dtype": "bfloat16", **extra}


_MISTRAL_7B = _llama_like(32, 4096, 14336, 32, 8, 32000, False, model_type="mistral")
_LLAMA_3_8B = _llama_like(32, 4096, 14336, 32, 8, 128256, False, model_type="llama")
_QWEN2_5_7B = _llama_like(28, 3584, 18944, 28, 4, 152064, False, model_type="qwen2")

KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "zephyr-7b": _MISTRAL_7B, "zephyr_rmu": _MISTRAL_7B, "mistral-7b": _MISTRAL_7B,
    "llama-3-8b": _LLAMA_3_8B, "llama-3.1-8b": _LLAMA_3_8B,
    "llama-3.1-70b": _llama_like(80, 8192, 28672, 64, 8, 128256, False, model_type="llama"),
    "llama-3.2-1b": _llama_like(16, 2048, 8192, 32, 8, 128256, True, model_type="llama"),
    "llama-3.2-3b": _llama_like(28, 3072, 8192, 24, 8, 128256, True, model_type="llama"),
    "gemma-2-2b": _llama_like(26, 2304, 9216, 8, 4, 256000, True, model_type="gemma2", head_dim=256),
    "gemma-2-9b": _llama_like(42, 3584, 14336, 16, 8, 256000, True, model_type="gemma2", head_dim=256),
    "qwen2.5-0.5b": _llama_like(24, 896, 4864, 14, 2, 151936, True, model_type="qwen2"),
    "qwen2.5-1.5b": _llama_like(28, 1536, 8960, 12, 2, 151936, True, model_type="qwen2"),
    "qwen2.5-3b": _llama_like(36, 2048, 11008, 16, 2, 151936, True, model_type="qwen2"),
    "qwen2.5-7b": _QWEN2_5_7B, "qwen2.5-coder-7b": _QWEN2_5_7B,
    "qwen2.5-coder-32b": _llama_like(64, 5120, 27648, 40, 8, 152064, False, model_type="qwen2"),
    "llama-2-7b": _llama_like(32, 4096, 11008, 32, 32, 32000, False, model_type="llama", torch_dtype="float16"),
    "llama-2-13b": _llama_like(40, 5120, 13824, 40, 40, 32000, False, model_type="llama", torch_dtype="float16"),
}

# Families whose MLP is one up and one down projection (no gate), with biases; the rest are counted as
# Llama's gated MLP without biases (an estimate for families not named here).
UNGATED_MLP = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi")


def _known_architecture(spec: str) -> dict[str, Any] | None:
    """The config fields of the first known name that ``spec`` contains (lower case)."""
    return next((fields for name, fields in KNOWN_ARCHITECTURES.items() if name in spec.lower()), None)


def parameter_count(hf: dict[str, Any]) -> int | None:
    """The parameters of a decoder-only transformer from its config.json fields (None when its width or depth
    is missing): exact for Llama, Mistral, Qwen2 and Gemma 2 (attention with grouped key/value heads and an
    explicit ``head_dim``, the gated MLP, norms, Qwen2's q/k/v biases, tied or untied embeddings), an
    estimate for other families."""
    d = hf.get("hidden_size") or hf.get("d_model") or hf.get("n_embd")
    layers = hf.get("num_hidden_layers") or hf.get("n_layer") or hf.get("n_layers")
    if not d or not layers:
        return None
    family = str(hf.get("model_type", ""))
    heads = hf.get("num_attention_heads") or hf.get("n_head")
    head_dim = hf.get("head_dim") or (d // heads if heads else None)
    q_dim = heads * head_dim if heads and head_dim else d
    kv_heads = hf.get("num_key_value_heads") or heads
    kv_dim = kv_heads * head_dim if kv_heads and head_dim else d
    intermediate = hf.get("intermediate_size") or hf.get("n_inner") or 4 * d
    ungated = family in UNGATED_MLP
    attention = 2 * d * q_dim + 2 * d * kv_dim
    if family == "qwen2" or hf.get("attention_bias"):
        attention += q_dim + 2 * kv_dim + (d if hf.get("attention_bias") else 0)
    mlp = (2 if ungated else 3) * d * intermediate + ((intermediate + d) if ungated or hf.get("mlp_bias") else 0)
    norms = (4 if family.startswith("gemma2") or family.startswith("gemma3") else 2) * d
    vocab = hf.get("vocab_size") or 32_000
    tied = hf.get("tie_word_embeddings", family.startswith("gemma"))
    return layers * (attention + mlp + norms) + d + vocab * d * (1 if tied else 2)


def weight_bytes(hf: dict[str, Any]) -> int:
    """Bytes per parameter of the checkpoint the hub serves (its ``torch_dtype``; bf16 when not said)."""
    return BYTES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), 2)


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
    # The models' parameters and config fields (of the first model whose architecture is known).
    params: int | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    # Hub models this run downloads into the Hugging Face cache: (name, bytes; None when the size is unknown).
    downloads: list[tuple[str, int | None]] = field(default_factory=list)
    estimates: list[str] = field(default_factory=list)
    to_fetch: list[str] = field(default_factory=list)
    gated: list[str] = field(default_factory=list)
    # The plan the checks were made for: (stage, fingerprint, status), as ``run.plan`` gives it.
    planned: list[tuple[Stage, str, str]] | None = None


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


def _hub_weights_cached(spec: str) -> bool:
    """Whether the local HF cache's snapshot of ``spec`` holds its weights (every shard its index names), not
    only the config.json that configuration checks download."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = try_to_load_from_cache(spec, index)
            if isinstance(path, str):
                shards = set(json.loads(Path(path).read_text()).get("weight_map", {}).values())
                return bool(shards) and all((Path(path).parent / shard).is_file() for shard in shards)
        return any(isinstance(try_to_load_from_cache(spec, name), str) for name in ("model.safetensors", "pytorch_model.bin"))
    except Exception:  # an id the hub client refuses, an unreadable index: not known to be there
        return False


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
        hf, where = _known_architecture(spec), "hub"
        if hf is None:
            check.notes.append(f"models.{which}: {spec}: hub name, not in the local cache; its size is unknown until "
                               "download, so the disk its download, store and crosscoder need is not counted here.")
            _add_download(check, spec, None)
            return
    family = hf.get("model_type", "?") if where != "hub" else f"known architecture ({hf['model_type']})"
    d = hf.get("hidden_size") or hf.get("d_model") or hf.get("n_embd")
    layers = hf.get("num_hidden_layers") or hf.get("n_layer") or hf.get("n_layers")
    params = parameter_count(hf)
    size = f", {params / 1e9:.2f}B parameters" if params else ""
    check.notes.append(f"models.{which}: {spec} ({where}): {family}, d_model {d}, {layers} layers{size}.")
    if where == "hub" or (where == "hub (cached)" and not _hub_weights_cached(spec)):
        _add_download(check, spec, params * weight_bytes(hf) if params else None)
    if params and check.params is None:
        check.params, check.architecture = params, hf
    for name, value in (("d_model", d), ("n_layers", layers)):
        known = getattr(check, name)
        if value is not None and known is not None and value != known:
            check.problems.append(f"models.base and models.edited differ in {name} ({known} vs {value}).")
        elif value is not None:
            setattr(check, name, value)


def _add_download(check: ConfigCheck, spec: str, size: int | None) -> None:
    if all(spec != name for name, _ in check.downloads):
        check.downloads.append((spec, size))


def _describe_client_models(config: RunConfig, check: ConfigCheck) -> None:
    """The models that in-process vLLM clients (``kind: vllm``) load from the hub: downloads too."""
    for key, client in (("explain.client", config.explain.client), ("map.client", config.map.client)):
        spec = client.model
        if client.kind != "vllm" or not spec or ModelSpec.parse(spec).kind != "hub" or _hub_weights_cached(spec):
            continue
        hf = _hub_hf_config(spec) or _known_architecture(spec)
        params = parameter_count(hf) if hf else None
        _add_download(check, spec, params * weight_bytes(hf) if hf and params else None)
        if params is None:
            check.notes.append(f"{key}: {spec}: hub name, not in the local cache; its size is unknown until download.")


def _model_facts(config: RunConfig) -> ConfigCheck:
    """What the config's model names tell offline: widths, depth, parameters, the hub downloads (the run's
    models and in-process vLLM clients' models)."""
    check = ConfigCheck()
    for which in ("base", "edited"):
        _describe_model(which, getattr(config.models, which), check, config)
    _describe_client_models(config, check)
    return check


def check_config(config: RunConfig, only: list[str] | None = None, world_size: int = 1) -> ConfigCheck:
    """Models and corpus named and findable, layer in range where the architecture is known, disk and time
    estimates of the stages the plan runs (within ``only``: `mneme run --only`), memory; with ``world_size``
    ranks (`--nproc`), a training batch they can split."""
    from huggingface_hub import constants as hub_constants

    check_only(only, STAGES, config)
    check = _model_facts(config)
    if config.intervention is None and same_model(config.models.base, config.models.edited):
        check.warnings.append(f"models.base and models.edited are the same model ({config.models.base}): a "
                              "crosscoder finds no difference between a model and itself.")
    check.problems += config_problems(config)
    # With HF_HUB_OFFLINE set, `mneme run`'s check of the hub models asks the hub nothing, so the dry run (which
    # never asks it) makes it too; a warning: the config may be meant for another machine.
    if hub_constants.HF_HUB_OFFLINE:
        check.warnings += [f"{problem} (`mneme run` refuses it on this machine)" for problem in hub_model_problems(config)]
    source = config.corpus.source
    if source.startswith("hf:"):
        check.notes.append(f"corpus: Hugging Face dataset {source[3:]} (streamed).")
    elif Path(source).is_file():
        check.notes.append(f"corpus: local file {source} ({Path(source).stat().st_size / 2**20:.1f} MiB).")
    h = config.harvest
    if check.n_layers is not None and h.layer >= check.n_layers:
        check.problems.append(f"harvest.layer {h.layer} is out of range: the models have {check.n_layers} layers "
                              f"(0..{check.n_layers - 1}).")
    if config.training.stream:
        check.notes.append("disk: training.stream is set: activations are harvested on the fly, no store is written.")
    elif not h.max_tokens and not source.startswith("hf:"):  # a hub data set without it is a problem (above)
        check.warnings.append("disk: harvest.max_tokens is not set: the whole corpus is harvested, and the store's "
                              "size is not counted here nor checked before the run (set harvest.max_tokens to size it).")
    check.planned = plan(config, STAGES)
    check.problems += unselected_inputs(check.planned, only)
    try:
        check_batch_shared(config, STAGES, only, world_size, check.planned)
    except ConfigError as err:
        check.problems.append(f"--nproc {world_size}: {err}")
    pending = pending_outputs(config, check.planned, only)
    # A warning, as a hub model missing here is: the environment that runs the config may set the key.
    check.warnings += [f"{problem} (`mneme run` refuses it in this environment)" for problem in client_problems(config, pending)]
    control = config.predict.control_run
    if control and "predict" in pending and not RunLayout(Path(control)).attribution.is_dir():
        # A warning: the control run may be under way beside this one; predict reads it only at its turn.
        check.warnings.append(f"predict.control_run {control} has no attribution yet: the predict stage fails unless "
                              "the control run has attributed its latents by then (run it first, `mneme run` with "
                              "models.edited a benignly perturbed copy of the base), or leave control_run out.")
    needs = _disk_needs(config, check)
    _check_disk([need for need in needs if need.stage in pending], check, pending)
    if needs and not any(need.stage in pending for need in needs):
        check.notes.append(f"disk: the stages that write large files ({', '.join(dict.fromkeys(n.stage for n in needs))}) "
                           "are done or not selected: nothing large left to write.")
    if check.d_model is not None:
        d = check.d_model
        cc = config.crosscoder.resolve(d)
        params = cc.parameter_count
        memory = params * BYTES[cc.dtype] * 4 + config.training.batch_size * cc.dict_size * 4 * 3
        check.notes.append(f"training memory: about {memory / 2**30:.2f} GiB (crosscoder {params / 1e6:.1f}M parameters, "
                           f"Adam state, batch {config.training.batch_size}).")
    check.gated = gated_inputs(config)
    check.to_fetch = missing_inputs(config)
    check.estimates = estimates(config, check, pending)
    return check


@dataclass(frozen=True)
class DiskNeed:
    """What a run writes, how many bytes, and the folder it goes to (its disk is that of the nearest
    existing folder above it). ``remedies``: what would make it fit, each an alternative (several items
    share some: a disk's message names each once). ``transient``: there only while one stage runs
    (checkpoints)."""

    what: str
    size: int
    folder: Path
    remedies: tuple[str, ...]
    # The stage that writes it (a download: the first stage that loads the model).
    stage: str
    transient: bool = False


def _disk_needs(config: RunConfig, check: ConfigCheck) -> list[DiskNeed]:
    """The hub downloads, the intervention's checkpoints and edited model, the activation store, and the
    crosscoder's checkpoints and files this run writes, where their sizes are known."""
    from huggingface_hub import constants

    run_dir, needs = Path(config.run_dir), []
    elsewhere = "set run_dir to a folder on a larger disk"
    clients = {config.explain.client.model: "explain", config.map.client.model: "map"}
    for spec, size in check.downloads:
        if size is not None:
            # The first stage that loads the run's models (with training.stream, training harvests).
            loader = ("intervention" if config.intervention is not None
                      else "train" if config.training.stream else "harvest")
            if spec not in (config.models.base, config.models.edited):
                loader = clients.get(spec, loader)
            needs.append(DiskNeed(f"download of {spec}", size, Path(constants.HF_HUB_CACHE),
                                  ("set HF_HOME (or HF_HUB_CACHE) to a folder on a larger disk, or download the "
                                   "models there first",), loader))
    iv = config.intervention
    if iv is not None and check.params is not None:
        from mneme_plugin.interventions.checkpoints import AT_ONCE, checkpoint_bytes

        settings = iv.resolved("")
        dtype = _intervention_dtype(settings)
        trained = _checkpoint_params(iv.kind, settings, check)
        if trained:
            needs.append(DiskNeed("the intervention's last checkpoint and the one being written",
                                  AT_ONCE * checkpoint_bytes(trained * BYTES[dtype]), run_dir, (elsewhere,), "intervention",
                                  transient=True))
        needs.append(DiskNeed(f"edited model ({dtype})", check.params * BYTES[dtype], run_dir, (elsewhere,), "intervention"))
    h = config.harvest
    if check.d_model is not None and not config.training.stream and h.max_tokens:
        needs.append(DiskNeed(f"activation store of {h.max_tokens:,} tokens ({h.dtype})",
                              h.max_tokens * 2 * check.d_model * BYTES[h.dtype], run_dir,
                              ("lower harvest.max_tokens or set training.stream: true (train while harvesting, no "
                               "store on disk)",), "harvest"))
    if check.d_model is not None:
        from mneme_plugin.crosscoder.training import disk_need

        checkpoint, checkpoints_at_once, final = disk_need(config.crosscoder.resolve(check.d_model), config.training)
        smaller = "a smaller crosscoder (crosscoder.expansion_factor or dict_size)"
        if checkpoints_at_once:
            kept = config.training.keep_finished_checkpoints  # else removed once the crosscoder is written
            needs.append(DiskNeed(f"crosscoder checkpoints (up to {checkpoints_at_once // checkpoint} of "
                                  f"{size_text(checkpoint)} at once{', kept after training' if kept else ''})",
                                  checkpoints_at_once, run_dir,
                                  ("keep fewer checkpoints (training.keep_checkpoints) or none (training.checkpoint_every: "
                                   "0)" + (", or not after training (training.keep_finished_checkpoints: false)" if kept else ""),
                                   smaller), "train", transient=not kept))
        needs.append(DiskNeed("crosscoder", final, run_dir, (smaller, elsewhere), "train"))
    return needs


@dataclass(frozen=True)
class DiskPeak:
    """What a run writes to one disk: its items, the bytes at the peak (less what is written already), the
    free bytes."""

    needs: list[DiskNeed]
    peak: int
    free: int

    @property
    def where(self) -> str:
        return " and ".join(sorted({str(n.folder) for n in self.needs}))

    def items(self) -> str:
        return "; ".join(f"{n.what} ~{size_text(n.size)}{', while it trains' if n.transient else ''}" for n in self.needs)

    def remedies(self) -> str:
        """What to change, that of the largest item first."""
        return "; or ".join(dict.fromkeys(r for n in sorted(self.needs, key=lambda n: -n.size) for r in n.remedies))


def _disk_peaks(needs: list[DiskNeed], written: dict[str, tuple[Path, int]] | None = None) -> list[DiskPeak]:
    """The needs summed per disk. The peak is what stays plus the largest of what is there only while one stage
    runs (the intervention's or the crosscoder's checkpoints: the stages run one after the other), less
    ``written``: per stage, the bytes its output folder holds already (a resumed stage's shards or checkpoints;
    a redone stage's old outputs, removed before it runs), counted on that folder's disk."""
    disks: dict[int, list[DiskNeed]] = {}
    for need in needs:
        disks.setdefault(nearest_existing(need.folder).stat().st_dev, []).append(need)
    held: dict[int, int] = {}
    for stage in {n.stage for n in needs}:
        folder, size = (written or {}).get(stage, (Path(), 0))
        if size:
            device = nearest_existing(folder).stat().st_dev
            held[device] = held.get(device, 0) + size
    peaks = []
    for device, on_disk in disks.items():
        total = (sum(n.size for n in on_disk if not n.transient)
                 + max((n.size for n in on_disk if n.transient), default=0))
        peaks.append(DiskPeak(on_disk, max(total - held.get(device, 0), 0),
                              shutil.disk_usage(nearest_existing(on_disk[0].folder)).free))
    return peaks


def _check_disk(needs: list[DiskNeed], check: ConfigCheck, written: dict[str, tuple[Path, int]] | None = None) -> None:
    """One line per disk: what goes there (less what the stages' folders hold, ``written``) against its free
    space (a warning when it does not fit)."""
    for disk in _disk_peaks(needs, written):
        if disk.peak > disk.free:  # a warning: the run may be meant for another machine, and the sizes are estimates
            check.warnings.append(f"disk: {disk.where} needs ~{size_text(disk.peak)} at its peak but its disk has "
                                  f"{size_text(disk.free)} free on this machine ({disk.items()}): {disk.remedies()}.")
            continue
        check.notes.append(f"disk: {disk.where}: ~{size_text(disk.peak)} at its peak, of {size_text(disk.free)} free "
                           f"({disk.items()}).")
        store = next((n for n in disk.needs if n.what.startswith("activation store")), None)
        if store is not None and store.size > 0.5 * disk.free:
            check.notes.append("disk: the store would take over half of the free disk: consider "
                               "training.stream: true (train while harvesting, no store on disk).")


def disk_shortfalls(config: RunConfig, written: dict[str, tuple[Path, int]], *, loaded: Collection[str] = ()) -> list[str]:
    """`mneme run`'s check before its first stage: per disk, what the stages in ``written`` (those about to run:
    stage -> (output folder, bytes it holds now)) will write, less what they hold, against the free space; one
    message per disk that falls short. Each stage checks its own writes again when it starts; this sums them,
    so a harvest of hours does not fill the disk the crosscoder's checkpoints need. ``loaded``: the models
    passed as objects (``models=``), not downloaded."""
    check = _model_facts(config)
    check.downloads = [(spec, size) for spec, size in check.downloads
                       if not any(spec == getattr(config.models, which) for which in loaded)]
    needs = [need for need in _disk_needs(config, check) if need.stage in written]
    return [f"The run's stages ({', '.join(dict.fromkeys(n.stage for n in disk.needs))}) need ~{size_text(disk.peak)} "
            f"more on the disk of {disk.where} at their peak, but it has {size_text(disk.free)} free ({disk.items()}): "
            f"{disk.remedies()}." for disk in _disk_peaks(needs, written) if disk.peak > disk.free]


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


def _duration(seconds: float) -> str:
    if seconds < 60:  # not "0 min"
        return f"{max(seconds, 1):.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _intervention_dtype(settings: Any) -> str:
    """The dtype the intervention trains and saves in (``resolve_dtype``: ``auto`` is bf16 on a GPU, float32 on a
    CPU; an ``auto`` device counts as a GPU, as the estimates do)."""
    dtype = getattr(settings, "dtype", "auto")
    if dtype == "auto":
        return "float32" if str(getattr(settings, "device", "auto")).startswith("cpu") else "bfloat16"
    return dtype


def _checkpoint_params(kind: str, settings: Any, check: ConfigCheck) -> int:
    """The parameters an intervention checkpoints while it trains (with their two AdamW moments): 0 where
    the trained part is small (LoRA), unknown, or not checkpointed."""
    if not getattr(settings, "checkpoint_every", 0) or check.params is None:
        return 0
    if kind == "rmu" and settings.param_names is None and check.d_model is not None:
        # One MLP projection (d x intermediate) per layer.
        intermediate = check.architecture.get("intermediate_size") or 8 * check.d_model // 3
        return len(settings.layer_ids) * check.d_model * intermediate
    if kind == "sft" and settings.lora is None:
        return check.params
    return 0


def _checkpoint_note(kind: str, settings: Any, check: ConfigCheck) -> str:
    """The size of the intervention's checkpoint while it trains: the trained parameters and their two
    AdamW moments (in the dtype it trains in), or nothing where the trained part is small (LoRA) or unknown."""
    from mneme_plugin.interventions.checkpoints import checkpoint_bytes

    trained = _checkpoint_params(kind, settings, check)
    if not trained:
        return ""
    return (f"; while it trains, a checkpoint of ~{size_text(checkpoint_bytes(trained * BYTES[_intervention_dtype(settings)]))} "
            "in edited_model/ "
            "(removed when the model is written)")


def _sft_examples(settings: Any) -> int | None:
    """How many examples SFT trains on: a local JSONL file's lines (at most ``max_examples``); else
    ``max_examples``; None when unknown (a hub dataset, another file type, a file not there yet)."""
    data = Path(settings.data)
    lines = data_file_rows(data) if data.suffix == ".jsonl" else None
    if lines is None:
        return settings.max_examples
    return lines if settings.max_examples is None else min(lines, settings.max_examples)


def _lm_eval_questions(config: LMEvalConfig) -> int:
    """About how many questions lm-eval asks each model for ``config`` (an ``LMEvalConfig``): a local task's
    rows (``harness.local_task_size``: a task named like a benchmark but reading a small local file counts
    that file), else the known benchmarks' sizes (1,000 for another task), cut by ``limit``, which lm-eval
    applies per task: a group with ``limit: 50`` asks 50 per task it runs (MMLU-Pro's 14: 700), counted
    from lm-eval's task index (offline, cached per process: the dry run's task checks built it)."""
    from mneme_plugin.groundtruth.harness import local_task_size, planned_tasks

    def limited(size: int) -> int:
        if config.limit is None:
            return size
        return math.ceil(size * config.limit) if config.limit < 1 else min(size, int(config.limit))  # lm-eval's rule

    total = 0
    for name in config.tasks:
        try:
            leaves = planned_tasks(config.replace(tasks=[name]))
            local = [local_task_size(config, leaf) for leaf in leaves or ()]
        except ImportError:
            leaves, local = None, []
        if local and None not in local:
            total += sum(limited(size) for size in local)
            continue
        full = LM_EVAL_QUESTIONS.get(name, 1000)
        if config.limit is None or config.limit < 1:
            total += limited(full)
        else:
            total += min(full, int(config.limit) * len(leaves or [name]))
    return total


def estimates(config: RunConfig, check: ConfigCheck, pending: Collection[str] | None = None) -> list[str]:
    """Rough time and disk per step on one H100-class GPU (from the architecture; none when it is unknown), for
    the stages in ``pending`` (default: every stage; the others are done or not selected)."""
    params = check.params
    if params is None:
        return []
    out = []
    runs = (lambda *names: True) if pending is None else (lambda *names: any(n in pending for n in names))
    forward = 2 * params  # FLOPs per token of one forward pass
    iv = config.intervention
    if iv is not None and runs("intervention"):
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
        dtype = _intervention_dtype(settings)
        out.append(f"intervention ({iv.kind}): {timing}; edited model {size_text(params * BYTES[dtype])} ({dtype})"
                   + _checkpoint_note(iv.kind, settings, check))
    for name, table in config.ground_truth.tables.items() if runs("ground_truth") else ():
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
    if h.max_tokens and (runs("train", "attribute") if config.training.stream else runs("harvest")):
        harvest_time = _duration(2 * h.max_tokens * forward / GPU_FLOPS * 3)
        out.append(f"harvest: ~{harvest_time} for {h.max_tokens:,} tokens through both models"
                   # Streaming keeps no store: attribute harvests the same tokens again.
                   + (f", twice with training.stream (in train, then ~{harvest_time} again in attribute)"
                      if config.training.stream else ""))
    cc = config.crosscoder.resolve(int(check.d_model or 0))
    t = config.training
    train_flops = t.steps * t.batch_size * 6 * 2 * 2 * int(check.d_model or 0) * cc.dict_size
    if runs("train"):
        out.append(f"train: ~{_duration(train_flops / GPU_FLOPS * 3)} ({t.steps:,} steps of {t.batch_size:,} rows, "
                   f"{cc.dict_size:,} latents)")
    if not runs("collect", "explain", "map"):
        return out
    llm = [name for name, uses in (("explain", config.explain.calls_llm), ("map", config.map.calls_llm)) if uses]
    calls = (f"; {' and '.join(llm)} call{'s' if len(llm) == 1 else ''} the LLM client once per collected latent"
             if llm else "; explain and map run offline (no LLM call)")
    out.append(f"collect / explain / map: collect reads {f'{config.collect.harvest.max_tokens:,}' if config.collect.harvest and config.collect.harvest.max_tokens else 'the corpus'} "
               f"tokens{calls}")
    return out


def format_plan(config: RunConfig, check: ConfigCheck, only: list[str] | None = None) -> str:
    """The checks and the plan; with ``only`` (``mneme run --only``), the other stages read "not selected"."""
    check_only(only, STAGES, config)
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
    planned = check.planned if check.planned is not None else plan(config, STAGES)
    width = max([10] + [len(stage.name) for stage, _, _ in planned])
    stale = stale_outside_only(planned, only)
    off = switched_off(config, STAGES)  # done under an earlier config: `mneme run` removes what they wrote
    for stage, fingerprint, status in planned:
        if stage.name in stale:  # `mneme run --only` removes them: made from what the run redoes
            status = f"not selected (--only); its outputs go: {status}"
        elif only and stage.name not in only and status != "disabled":
            status = "not selected (--only)"
        elif status == "disabled" and stage in off:
            status = "disabled; its outputs go"
        lines.append(f"  {stage.name:<{width}} {status:<24} config {fingerprint}")
    lines += [f"  {stage.name:<{width}} not in this config; its outputs go" for stage in off if not stage.present(config)]
    lines.append("")
    lines.append("The config has problems (FAIL above)." if check.problems
                 else "The config looks runnable, but read the WARN lines above first." if check.warnings
                 else "The config looks runnable.")
    if check.problems or check.to_fetch:
        lines.append(relative_paths_note())
    return "\n".join(lines)
