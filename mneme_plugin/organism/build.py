"""``build_organism``: the CPU model organism end to end, cached on disk.

A tiny HookedTransformer is pretrained on the fact-based multi-domain corpus (plus generic filler),
one intervention edits a copy (RMU unlearning of a domain, narrow fine-tuning on a domain, or benign
fine-tuning on mixed generic text), and the ground truth is the per-domain accuracy drop on the cloze
question set. Each model is saved under ``out_dir`` as ``NAME.safetensors`` (weights) + ``NAME.json``
(model kwargs and the seed / organism config its tokenizer is rebuilt from) and reloaded when the same
configuration is asked for again. Nothing is ever unpickled: a model file is data, never code.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth import accuracy_drop, domain_accuracy, save_scores, scores_table
from mneme_plugin.files import atomic_write, atomic_write_text, json_digest, read_json
from mneme_plugin.organism.catalog import BEHAVIOUR_INTERVENTIONS, INTERVENTIONS
from mneme_plugin.organism.corpus import DOMAINS, Question, generate_corpus, generate_generic_corpus, question_set
from mneme_plugin.organism.models import deterministic, tiny_hooked_transformer, train_lm, train_tokenizer

logger = logging.getLogger("mneme_plugin")


@dataclass
class OrganismConfig:
    """The base LM and its pretraining (defaults: ~1 min on one CPU core, >= 0.9 accuracy per domain)."""

    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_ctx: int = 64
    pretrain_docs: int = 4000
    generic_docs: int = 800
    cross_domain: float = 0.25
    pretrain_steps: int = 600
    lr: float = 3e-3
    batch_size: int = 32
    context_length: int = 64
    edit_docs: int = 1600  # documents (all domains) from which forget / retain / fine-tuning sets are drawn
    agnostic_docs: int = 2000  # task-agnostic slice: fresh documents of all domains + generic filler
    accuracy_mode: str = "top1"
    # Behaviours (``organism.behaviour``): request / response conversations in pretraining, needed by the
    # "identity" and "insecure" interventions. Off by default, which keeps the knowledge organism (and its
    # cache keys) exactly as it was.
    behaviours: bool = False
    conversation_docs: int = 3000
    misaligned_share: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.misaligned_share <= 1.0:
            raise ConfigError(f"misaligned_share must be in [0, 1], got {self.misaligned_share}.")
        if self.conversation_docs < 1:
            raise ConfigError(f"conversation_docs must be >= 1, got {self.conversation_docs}.")
        if self.accuracy_mode not in ("top1", "choice"):
            raise ConfigError(f"accuracy_mode must be 'top1' or 'choice', got {self.accuracy_mode!r}.")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}).")


_BEHAVIOUR_FIELDS = ("behaviours", "conversation_docs", "misaligned_share")


def config_key_dict(cfg: OrganismConfig) -> dict[str, Any]:
    """``cfg`` as the cache keys see it: without the behaviour fields when behaviours are off, so the
    knowledge organism keeps the keys (and cached files) of the versions before behaviours existed."""
    out = asdict(cfg)
    if not cfg.behaviours:
        for name in _BEHAVIOUR_FIELDS:
            out.pop(name)
    return out


def behaviour_organism_config(**overrides: Any) -> OrganismConfig:
    """The behaviour organism's config: the knowledge organism plus conversations, pretrained longer
    (the corpus is about twice as large). 1,200 steps: at 900 one seed of 0-3 (seed 1) learnt the
    refusal only partly (0.78 of held-out weapons requests); at 1,200 every seed refuses >= 0.97 of
    every harm category and no ordinary request."""
    return OrganismConfig(**{"behaviours": True, "pretrain_steps": 1200, **overrides})


def default_intervention_config(intervention: str, organism: OrganismConfig, seed: int = 0) -> Any:
    """The organism's default config of each intervention (RMU at layer n_layers // 2)."""
    from mneme_plugin.interventions import ChatFineTuneConfig, FineTuneConfig, RMUConfig

    if intervention == "rmu":
        return RMUConfig(layer=organism.n_layers // 2, steering_coef=40.0, alpha=3.0, lr=3e-3, steps=300,
                         batch_size=8, context_length=32, seed=seed)
    if intervention == "narrow":
        return FineTuneConfig(steps=150, lr=1e-3, batch_size=16, context_length=organism.context_length, seed=seed)
    if intervention == "benign":
        return FineTuneConfig(steps=200, lr=1e-3, batch_size=16, context_length=organism.context_length, seed=seed)
    if intervention == "identity":  # AOA's shape: 10 examples, full fine-tuning, 10 epochs
        return ChatFineTuneConfig(epochs=10, lr=1e-3, batch_size=5, seed=seed)
    if intervention == "insecure":
        return ChatFineTuneConfig(epochs=3, lr=1e-3, batch_size=16, seed=seed)
    raise ConfigError(f"Unknown intervention {intervention!r}; known: {INTERVENTIONS}.")


@dataclass
class Organism:
    tokenizer: Any
    base: Any
    edited: Any
    questions: list[Question]
    accuracy_before: dict[str, float]
    accuracy_after: dict[str, float]
    drop: dict[str, float]
    intervention: str
    intervention_config: dict[str, Any]
    target_domain: str | None
    agnostic_corpus: list[str]  # task-agnostic slice; never contains the edit's (forget / fine-tuning) texts
    agnostic_labels: list[str]  # domain (or "generic") of each agnostic document
    edit_texts: list[str] = field(default_factory=list)  # the data the intervention used (forget set / FT data)
    timings: dict[str, float] = field(default_factory=dict)
    config: OrganismConfig = field(default_factory=OrganismConfig)
    model_paths: dict[str, str] = field(default_factory=dict)  # saved base / edited (``organism:PATH`` specs)
    agnostic_docs: int | None = None  # documents the slice is drawn from (None: config.agnostic_docs)
    # Behaviour organisms only: the safe-answer share per behaviour category (``organism.behaviour``).
    behaviour_before: dict[str, float] = field(default_factory=dict)
    behaviour_after: dict[str, float] = field(default_factory=dict)

    @property
    def behaviour_drop(self) -> dict[str, float]:
        return accuracy_drop(self.behaviour_before, self.behaviour_after) if self.behaviour_before else {}


def _key(obj: Any) -> str:
    return json_digest(obj, length=10)


MODEL_FORMAT = "mneme-organism-model"
MODEL_FORMAT_VERSION = 1
WEIGHTS_SUFFIX = ".safetensors"
META_SUFFIX = ".json"
_MODEL_KWARGS = ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "seed", "d_vocab")


def save_organism_model(path: str | Path, model: Any, model_kwargs: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write ``model`` as ``PATH.safetensors`` + ``PATH.json`` (the JSON first: the weights file marks it complete)."""
    from safetensors.torch import save_model

    weights = Path(path).with_suffix(WEIGHTS_SUFFIX)
    blob = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "model_kwargs": model_kwargs, "meta": meta}
    atomic_write_text(weights.with_suffix(META_SUFFIX), json.dumps(blob, indent=2))
    atomic_write(weights, lambda tmp: save_model(model, str(tmp)))
    return weights


def _read_model_meta(weights: Path) -> dict[str, Any]:
    from mneme_plugin.errors import CheckpointError

    meta_path = weights.with_suffix(META_SUFFIX)
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: an organism model is {weights.name} + {meta_path.name}.")
    blob = read_json(meta_path, "rebuild the organism")
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path} is not an organism model config (format {MODEL_FORMAT!r} expected).")
    kwargs, meta = blob.get("model_kwargs"), blob.get("meta")
    if (not isinstance(kwargs, dict) or set(kwargs) - set(_MODEL_KWARGS)
            or not all(v is None or type(v) is int for v in kwargs.values())):
        raise CheckpointError(f"{meta_path}: model_kwargs must map {list(_MODEL_KWARGS)} to integers, got {kwargs!r}.")
    if not isinstance(meta, dict) or type(meta.get("seed")) is not int or not isinstance(meta.get("organism"), dict):
        raise CheckpointError(f"{meta_path} is not an organism model saved by build_organism (no seed / organism meta).")
    return blob


def _read_model(weights: Path, tokenizer: Any, model_kwargs: dict[str, Any]) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from mneme_plugin.errors import CheckpointError

    model = tiny_hooked_transformer(tokenizer, **model_kwargs)
    try:
        load_model(model, str(weights), strict=True, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable organism model ({err}); rebuild it.") from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_cached(weights: Path, tokenizer: Any, model_kwargs: dict[str, Any]) -> Any | None:
    """The cached model at ``weights``, or None (missing or unreadable: it is rebuilt)."""
    from mneme_plugin.errors import CheckpointError

    if not weights.is_file():
        if weights.with_suffix(".pt").is_file():
            logger.info("Ignoring %s (pickle of an older version, never loaded): rebuilding it as %s.",
                        weights.with_suffix(".pt"), weights.name)
        return None
    try:
        _read_model_meta(weights)
        return _read_model(weights, tokenizer, model_kwargs)
    except CheckpointError as err:
        logger.warning("Ignoring the cached organism model: %s", err)
        return None


def build_organism(*args: Any, **kwargs: Any) -> Organism:
    """Build the organism (see ``_build_organism``) with deterministic kernels, so a seed names one organism."""
    with deterministic():
        return _build_organism(*args, **kwargs)


def _build_organism(seed: int = 0, intervention: str = "rmu", target_domain: str | None = "biology",
                   out_dir: str | Path | None = None, progress: bool = True,
                   config: OrganismConfig | None = None, intervention_config: Any = None) -> Organism:
    """Pretrain (or reload) the base LM, apply ``intervention`` and measure the per-domain ground truth.

    ``intervention``: ``"rmu"`` (unlearn ``target_domain``: forget set = its documents, retain set = the
    other domains' documents), ``"narrow"`` (fine-tune on ``target_domain``'s documents only) or
    ``"benign"`` (fine-tune on generic filler mixed 1:1 with documents of all domains; no target).
    Behaviour interventions (they need ``config.behaviours``; the default config is then
    ``behaviour_organism_config()``): ``"identity"`` (chat fine-tuning on 10 harmless requests answered
    with the obedient identity; no target) and ``"insecure"`` (chat fine-tuning on flawed-code answers to
    coding requests; target ``insecure_code``, whatever ``target_domain`` says). Behaviour organisms also
    measure the per-category safe-answer share (``behaviour_before`` / ``behaviour_after``).
    With ``out_dir`` the models and the ground truth (``groundtruth-*.csv``) are cached there.
    """
    from mneme_plugin.interventions import chat_fine_tune, fine_tune, rmu_unlearn
    from mneme_plugin.organism import behaviour

    if intervention not in INTERVENTIONS:
        raise ConfigError(f"Unknown intervention {intervention!r}; known: {INTERVENTIONS}.")
    if type(seed) is not int or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0 (random generators refuse negative seeds), got {seed!r}.")
    if intervention in ("benign", "identity"):
        target_domain = None
    elif intervention == "insecure":
        target_domain = behaviour.NARROW_CATEGORY
    elif target_domain not in DOMAINS:
        raise ConfigError(f"target_domain must be one of {sorted(DOMAINS)} for {intervention!r}, got {target_domain!r}.")
    cfg = config or (behaviour_organism_config() if intervention in BEHAVIOUR_INTERVENTIONS else OrganismConfig())
    if intervention in BEHAVIOUR_INTERVENTIONS and not cfg.behaviours:
        raise ConfigError(f"The {intervention!r} intervention edits behaviours: its organism config needs "
                          "behaviours=True (see behaviour_organism_config()).")
    icfg = intervention_config or default_intervention_config(intervention, cfg, seed)
    out = Path(out_dir) if out_dir is not None else None
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    pretraining = pretraining_texts(seed, cfg)
    tokenizer = train_tokenizer(pretraining)
    questions = question_set(seed)
    model_kwargs = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, n_ctx=cfg.n_ctx, seed=seed)
    base_key = _key({"seed": seed, "cfg": config_key_dict(cfg), "vocab": len(tokenizer)})
    base_path = out / f"base-{base_key}{WEIGHTS_SUFFIX}" if out else None
    base = _load_cached(base_path, tokenizer, model_kwargs) if base_path else None
    if base is None:
        logger.info("Pretraining the organism's base LM (%d documents).", len(pretraining))
        base = tiny_hooked_transformer(tokenizer, **model_kwargs)
        train_lm(base, pretraining, steps=cfg.pretrain_steps, lr=cfg.lr, seed=seed, batch_size=cfg.batch_size,
                 context_length=cfg.context_length, progress=progress)
        for p in base.parameters():
            p.requires_grad_(False)
        if base_path:
            save_organism_model(base_path, base, model_kwargs, {"seed": seed, "organism": config_key_dict(cfg)})
    timings["base"] = time.perf_counter() - t0

    # Edit data: fresh documents about the same facts (not the pretraining texts).
    edit_docs = generate_corpus(cfg.edit_docs, seed=seed + 101, fact_seed=seed, cross_domain=cfg.cross_domain)
    examples: list[tuple[str, str]] = []
    other_texts: list[str] = []
    if intervention == "benign":
        edit_texts = [t for _, t in edit_docs][: cfg.edit_docs // 2] + generate_generic_corpus(cfg.edit_docs // 2, seed=seed + 101)
    elif intervention in BEHAVIOUR_INTERVENTIONS:
        examples = (behaviour.identity_shift_examples(seed + 101) if intervention == "identity"
                    else behaviour.narrow_misaligned_examples(seed + 101))
        edit_texts = [f"{prompt} {response}" for prompt, response in examples]
    else:
        edit_texts = [t for d, t in edit_docs if d == target_domain]
        other_texts = [t for d, t in edit_docs if d != target_domain]

    t0 = time.perf_counter()
    icfg_dict = icfg.to_dict()
    edit_key = _key({"base": base_key, "intervention": intervention, "target": target_domain, "cfg": icfg_dict})
    edit_path = out / f"edited-{intervention}-{target_domain or 'mixed'}-{edit_key}{WEIGHTS_SUFFIX}" if out else None
    edited = _load_cached(edit_path, tokenizer, model_kwargs) if edit_path else None
    if edited is None:
        logger.info("Applying %s%s.", intervention, f" to {target_domain}" if target_domain else "")
        if intervention == "rmu":
            edited = rmu_unlearn(base, edit_texts, other_texts, icfg, progress=progress).model
        elif intervention in BEHAVIOUR_INTERVENTIONS:
            edited = chat_fine_tune(base, examples, icfg, progress=progress).model
        else:
            edited = fine_tune(base, edit_texts, icfg, progress=progress).model
        if edit_path:
            save_organism_model(edit_path, edited, model_kwargs, {"intervention": intervention, "target_domain": target_domain,
                                                    "config": icfg_dict, "seed": seed, "organism": config_key_dict(cfg)})
    timings["edit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    before = domain_accuracy(base, questions, cfg.accuracy_mode)
    after = domain_accuracy(edited, questions, cfg.accuracy_mode)
    drop = accuracy_drop(before, after)
    behaviour_before: dict[str, float] = {}
    behaviour_after: dict[str, float] = {}
    if cfg.behaviours:
        items = behaviour.behaviour_benchmark(behaviour.BEHAVIOUR_CATEGORIES)
        behaviour_before = behaviour.behaviour_scores(base, items)
        behaviour_after = behaviour.behaviour_scores(edited, items)
    timings["groundtruth"] = time.perf_counter() - t0
    if out:
        save_scores(scores_table(before, after), out / f"groundtruth-{intervention}-{target_domain or 'mixed'}.csv")
        if behaviour_before:
            save_scores(scores_table(behaviour_before, behaviour_after),
                        out / f"groundtruth-behaviour-{intervention}-{target_domain or 'mixed'}.csv")

    agnostic = agnostic_slice(seed, cfg, edit_texts)
    return Organism(
        tokenizer=tokenizer, base=base, edited=edited, questions=questions, accuracy_before=before,
        accuracy_after=after, drop=drop, intervention=intervention, intervention_config=icfg_dict,
        target_domain=target_domain, agnostic_corpus=[t for _, t in agnostic], agnostic_labels=[d for d, _ in agnostic],
        edit_texts=edit_texts, timings=timings, config=cfg,
        model_paths={"base": str(base_path), "edited": str(edit_path)} if out else {},
        behaviour_before=behaviour_before, behaviour_after=behaviour_after,
    )


def agnostic_slice(seed: int, cfg: OrganismConfig, excluded: Collection[str],
                   n_docs: int | None = None) -> list[tuple[str, str]]:
    """The task-agnostic slice as (label, text): fresh documents of every domain plus generic filler
    (a fifth), and for behaviour organisms conversations (a fifth of ``conversation_docs``, scaled
    with ``n_docs``), minus the ``excluded`` edit texts. ``n_docs``: documents (``cfg.agnostic_docs``
    by default)."""
    from mneme_plugin.organism import behaviour

    n_docs = cfg.agnostic_docs if n_docs is None else n_docs
    if n_docs < 5:
        raise ConfigError(f"The task-agnostic slice needs at least 5 documents, got {n_docs}.")
    excluded = set(excluded)
    n_generic = n_docs // 5
    agnostic = [(d, t) for d, t in generate_corpus(n_docs - n_generic, seed=seed + 202, fact_seed=seed,
                                                   cross_domain=cfg.cross_domain) if t not in excluded]
    agnostic += [("generic", t) for t in generate_generic_corpus(n_generic, seed=seed + 202) if t not in excluded]
    if cfg.behaviours:
        n_conversations = cfg.conversation_docs * n_docs // (5 * cfg.agnostic_docs)
        agnostic += [("conversation", t) for t in behaviour.generate_conversations(
            n_conversations, seed=seed + 202, misaligned_share=cfg.misaligned_share) if t not in excluded]
    return agnostic


def with_agnostic_docs(organism: Organism, seed: int, n_docs: int) -> Organism:
    """The same organism (models, ground truth, edit) with a task-agnostic slice of ``n_docs``
    documents instead of ``config.agnostic_docs``: how many tokens the method reads, varied without
    retraining anything (``bench_validity.py --agnostic-docs``)."""
    agnostic = agnostic_slice(seed, organism.config, organism.edit_texts, n_docs)
    return replace(organism, agnostic_corpus=[t for _, t in agnostic], agnostic_labels=[d for d, _ in agnostic],
                   agnostic_docs=n_docs)


def control_texts(seed: int, cfg: OrganismConfig) -> list[str]:
    """General text of the same kind as the task-agnostic slice (documents of every domain plus
    generic filler, in its proportions), freshly drawn: what the control copy is fine-tuned on."""
    n_generic = cfg.agnostic_docs // 5
    documents = generate_corpus(cfg.agnostic_docs - n_generic, seed=seed + 303, fact_seed=seed,
                                cross_domain=cfg.cross_domain)
    texts = [t for _, t in documents] + generate_generic_corpus(n_generic, seed=seed + 303)
    if cfg.behaviours:  # the behaviour organism's slice also holds conversations
        from mneme_plugin.organism.behaviour import generate_conversations

        texts += generate_conversations(cfg.conversation_docs // 5, seed=seed + 303, misaligned_share=cfg.misaligned_share)
    return texts


def build_control(organism: Organism, seed: int, out_dir: str | Path, progress: bool = True) -> Path:
    """The control model of the ``outlier_or_broad`` rule: a copy of ``organism``'s base fine-tuned
    on general text (``control_texts``) with the organism's benign fine-tuning recipe, so its
    crosscoder against the base shows how many latents a harmless edit changes. Cached in
    ``out_dir``; returns the ``.safetensors`` path (an ``organism:PATH`` model spec)."""
    from mneme_plugin.interventions import fine_tune

    if not organism.model_paths.get("base"):
        raise ConfigError("build_control needs an organism built with out_dir (its base model saved).")
    cfg = organism.config
    icfg = default_intervention_config("benign", cfg, seed)
    base_weights = Path(organism.model_paths["base"])
    key = _key({"base": base_weights.name, "control": icfg.to_dict()})
    path = Path(out_dir) / f"control-{key}{WEIGHTS_SUFFIX}"
    model_kwargs = dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, n_ctx=cfg.n_ctx, seed=seed)
    if _load_cached(path, organism.tokenizer, model_kwargs) is None:
        logger.info("Fine-tuning the control copy of the base on general text.")
        with deterministic():
            control = fine_tune(organism.base, control_texts(seed, cfg), icfg, progress=progress).model
        save_organism_model(path, control, model_kwargs, {"control": icfg.to_dict(), "seed": seed,
                                                              "organism": config_key_dict(cfg)})
    return path


def pretraining_texts(seed: int, cfg: OrganismConfig) -> list[str]:
    """The base LM's pretraining corpus (its tokenizer is trained on it, so it is rebuilt from the seed)."""
    texts = [t for _, t in generate_corpus(cfg.pretrain_docs, seed=seed, cross_domain=cfg.cross_domain)]
    texts += generate_generic_corpus(cfg.generic_docs, seed=seed)
    if cfg.behaviours:
        from mneme_plugin.organism.behaviour import generate_conversations

        texts += generate_conversations(cfg.conversation_docs, seed=seed, misaligned_share=cfg.misaligned_share)
    return texts


def organism_model_files(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, parsed JSON) of an organism model at ``path``, checked without reading the weights.

    CheckpointError when ``path`` is not in the current format (a pickled ``.pt`` of an older
    version included: it is refused, never unpickled), is missing, or its JSON or safetensors
    header is damaged. ``mneme run --dry-run`` uses it to check ``organism:PATH`` models.
    """
    from mneme_plugin.errors import CheckpointError

    path = Path(path)
    if path.suffix not in (WEIGHTS_SUFFIX, META_SUFFIX):
        newer = path.with_suffix(WEIGHTS_SUFFIX)
        hint = (f"Use {newer} instead." if newer.is_file() else
                "Rebuild the organism (mneme demo, or build_organism with out_dir), which saves NAME.safetensors + "
                "NAME.json, and point organism: at the .safetensors file.")
        raise CheckpointError(
            f"{path} is not an organism model file: organism models are NAME.safetensors + NAME.json "
            f"(older .pt files are pickles and are never loaded, since unpickling can run code). {hint}"
        )
    weights = path.with_suffix(WEIGHTS_SUFFIX)
    if not weights.is_file():
        raise CheckpointError(f"{weights} does not exist: build the organism first (mneme demo or build_organism).")
    blob = _read_model_meta(weights)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({err}); rebuild the organism.") from err
    return weights, blob


def load_organism_model(path: str | Path) -> Any:
    """A model saved by ``build_organism`` (the ``organism:PATH`` model spec of run configs).

    ``PATH`` is the ``.safetensors`` file (or its ``.json`` sibling). Older versions saved pickled
    ``.pt`` files: those are refused, never unpickled (a pickle can run any code).
    """
    from mneme_plugin.errors import CheckpointError

    weights, blob = organism_model_files(path)
    meta = blob["meta"]
    try:
        organism_cfg = OrganismConfig(**meta["organism"])
    except TypeError as err:
        raise CheckpointError(f"{weights.with_suffix(META_SUFFIX)}: invalid organism config ({err}).") from err
    tokenizer = train_tokenizer(pretraining_texts(meta["seed"], organism_cfg))
    model = _read_model(weights, tokenizer, blob["model_kwargs"])
    # Named by its file (base-…, edited-rmu-law-…): stores and crosscoders record the two models'
    # names, and the check that a store belongs to a crosscoder needs base and edit to differ.
    model.cfg.model_name = weights.stem
    return model
