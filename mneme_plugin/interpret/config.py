"""Dataclass configs of the interpretation stages: ``collect``, ``explain``, ``map``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.attribution.config import classes_problem
from mneme_plugin.config import ConfigMixin, Seed, require

VALUE_MODES = ("code", "weighted")
# Explainers without an LLM, and Delphi's by our name -> its class in delphi.explainers (the only two lists).
OFFLINE_EXPLAINERS = ("offline",)
DELPHI_EXPLAINERS = {"default": "DefaultExplainer", "contrastive": "ContrastiveExplainer"}
EXPLAINERS = OFFLINE_EXPLAINERS + tuple(DELPHI_EXPLAINERS)
CLIENTS = ("none", "openai", "vllm", "stub")
TRAIN_TYPES = ("top", "random", "quantiles", "mix")
MAPPERS = ("lexical", "embedding", "llm")
LABELERS = ("offline", "llm")
SCORERS = ("detection", "fuzz")


@dataclass
class CollectConfig(ConfigMixin):
    """Which latents to collect contexts for, how many of each kind to keep, and how the corpus is read.

    Attributes:
        latents: Explicit latent ids; None selects from the attribution table (or all latents).
        classes: Attribution classes to select from (e.g. ["base_only", "suppressed"]).
        per_class: Latents taken per class, most specific first (base-leaning classes by
            descending score, edited-leaning ones by ascending score, shared by |score|).
        reference_latents: Also collect a uniform random sample of this many live latents (any
            class, seeded by ``seed``; all live latents when there are fewer). Once explained and
            mapped, they are the reference the ``enrichment`` prediction rule compares against:
            each category's share among all live latents. 0: no reference sample.
        n_top: Top-activating contexts kept per latent (the Delphi "examples" head).
        n_random: Uniform sample of activating contexts per latent (for Delphi's quantiles).
        n_non_activating: Uniform sample of contexts where the latent never fires.
        example_ctx_len: Tokens per context (Delphi's example window; the cache rows); the
            windows' context_length must be a multiple of it.
        value: Per-token activation value: "code" (the crosscoder code f_j, default) or
            "weighted" (f_j * w_j, w_j the crosscoder's salience weight, as dashboards show).
        harvest: How the corpus is read (hook, windows, forward batch, token budget, device): a
            harvest config. None reads at the layer and hook the crosscoder records, with the
            harvest defaults (``mneme run`` passes its own harvest section).
        allow_hook_mismatch: Read at a layer / hook other than the one the crosscoder records
            (refused otherwise: its latents mean nothing elsewhere).
        encode_batch: Tokens encoded by the crosscoder at a time.
        n_splits: Latent-range splits of the Delphi cache (files per hookpoint).
        seed: Seed of the random samples.
    """

    runtime_fields = ("encode_batch",)

    latents: list[int] | None = None
    classes: list[str] | None = None
    per_class: int | None = 50
    reference_latents: int = 0
    n_top: int = 50
    n_random: int = 50
    n_non_activating: int = 50
    example_ctx_len: int = 32
    value: str = "code"
    harvest: HarvestConfig | None = None
    allow_hook_mismatch: bool = False
    encode_batch: int = 4096
    n_splits: int = 1
    seed: Seed = 0

    def __post_init__(self) -> None:
        if isinstance(self.harvest, dict):
            self.harvest = HarvestConfig.from_dict(self.harvest, section="collect.harvest")
        require(self.n_top >= 1, f"n_top must be >= 1, got {self.n_top}.")
        require(self.n_random >= 0 and self.n_non_activating >= 0, "n_random and n_non_activating must be >= 0.")
        require(self.example_ctx_len >= 2, f"example_ctx_len must be >= 2, got {self.example_ctx_len}.")
        if self.harvest is not None:
            check_windows(self.harvest.context_length, self.example_ctx_len)
        require(self.value in VALUE_MODES, f"value must be one of {VALUE_MODES}, got {self.value!r}.")
        require(self.n_splits >= 1, f"n_splits must be >= 1, got {self.n_splits}.")
        require(self.per_class is None or self.per_class >= 1, "per_class must be None or >= 1.")
        require(self.reference_latents >= 0, f"reference_latents must be >= 0, got {self.reference_latents}.")
        if self.classes is not None:  # a typo selected no latent, found only when contexts were collected
            problem = classes_problem(self.classes, "classes")
            require(problem is None, str(problem))


def check_windows(context_length: int, example_ctx_len: int) -> None:
    """Contexts are cut from the forward windows, so a window must hold whole contexts."""
    require(
        context_length % example_ctx_len == 0,
        f"The windows' context_length ({context_length}) must be a multiple of collect.example_ctx_len "
        f"({example_ctx_len}).",
    )


@dataclass
class ClientConfig(ConfigMixin):
    """An LLM client. ``kind``: "openai" (any OpenAI-compatible chat endpoint: `vllm serve`, a hosted
    API), "vllm" (Delphi's in-process vLLM client, GPU), "stub" (an offline stand-in for smoke runs: its
    answers are a hash of the prompt) or "none" (offline methods only).

    ``api_key`` may be given as ``env:VARNAME`` to read it from the environment at run time.
    """

    runtime_fields = ("api_key", "concurrency", "max_retries", "backoff_base", "backoff_max", "timeout", "cache_dir")

    kind: str = "none"
    model: str = ""
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = "env:OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    timeout: float = 120.0
    max_tokens: int = 512
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.kind in CLIENTS, f"client kind must be one of {CLIENTS}, got {self.kind!r}.")
        require(self.concurrency >= 1, "concurrency must be >= 1.")
        require(self.max_retries >= 0, "max_retries must be >= 0.")
        require(self.timeout > 0, "timeout must be > 0.")

    def key_problem(self, where: str) -> str | None:
        """An https endpoint whose ``env:NAME`` key is not set (``clients.missing_key_problem``): checked when
        the client is about to be used, not here (a config may be written on another machine)."""
        from mneme_plugin.interpret.clients import missing_key_problem

        return missing_key_problem(self.base_url, self.api_key, where) if self.kind == "openai" else None


@dataclass
class ExplainConfig(ConfigMixin):
    """How latents are explained.

    Attributes:
        explainer: "offline" (no LLM: characteristic tokens and n-grams by log-odds against the
            corpus background), "default" (Delphi's DefaultExplainer) or "contrastive".
        client: the LLM client for Delphi explainers / scorers.
        n_examples: Top contexts shown to the explainer (Delphi's n_examples_train).
        train_type: Delphi's sampler train_type ("top", "random", "quantiles", "mix").
        min_examples: Latents with fewer activating contexts are skipped.
        scorers: Delphi scorers to run on each explanation ("detection", "fuzz").
        n_terms: Tokens / n-grams listed by the offline explainer.
        threshold: Fraction of a context's max activation above which a token counts as activating.
        n_context_terms: The offline explainer also lists up to this many words characteristic of
            the top contexts around the activations (0: only the activating tokens and phrases).
        seed: Seed of the scorers' shuffles, one random generator per scorer and latent (so a rerun sends
            the same scorer prompts, whatever order the latents finish in).
    """

    later_fields = ("seed",)

    explainer: str = "offline"
    client: ClientConfig = field(default_factory=ClientConfig)
    n_examples: int = 20
    train_type: str = "top"
    n_examples_test: int = 20
    n_quantiles: int = 5
    min_examples: int = 5
    n_non_activating: int = 20
    scorers: list[str] = field(default_factory=list)
    n_terms: int = 5
    threshold: float = 0.3
    temperature: float = 0.0
    n_context_terms: int = 0
    seed: Seed = 0

    def __post_init__(self) -> None:
        if isinstance(self.client, dict):
            self.client = ClientConfig.from_dict(self.client)
        require(self.explainer in EXPLAINERS, f"explainer must be one of {EXPLAINERS}, got {self.explainer!r}.")
        require(self.train_type in TRAIN_TYPES, f"train_type must be one of {TRAIN_TYPES}, got {self.train_type!r}.")
        unknown = sorted(set(self.scorers) - set(SCORERS))
        require(not unknown, f"Unknown scorer(s) {unknown}; known: {', '.join(SCORERS)}.")
        require(not (self.scorers and not self.calls_llm),
                f"scorers {self.scorers} run with Delphi's explainers (default, contrastive); the {self.explainer!r} "
                "explainer's descriptions are not scored: drop scorers, or use an LLM explainer.")
        require(
            not self.calls_llm or self.client.kind != "none",
            f"explainer {self.explainer!r} needs an LLM client: set client.kind to 'openai' or 'vllm' "
            "('stub' for smoke runs; `--client` on the command line).",
        )
        require(0 < self.threshold < 1, "threshold must be in (0, 1).")
        require(self.n_context_terms >= 0, f"n_context_terms must be >= 0, got {self.n_context_terms}.")

    @property
    def calls_llm(self) -> bool:
        """Whether the explainer asks the LLM client (one home for what the stage, the dry run and the key
        check decide from it)."""
        return self.explainer not in OFFLINE_EXPLAINERS


# The client kinds the map stage takes (``map.client.kind``; `mneme map --client` offers these): not the stub,
# whose answers (a hash of the prompt) name no category and no label.
MAP_CLIENTS = tuple(kind for kind in CLIENTS if kind != "stub")


@dataclass
class MapConfig(ConfigMixin):
    """How descriptions are mapped to categories.

    Attributes:
        taxonomies: Built-in names (`mneme taxonomies` lists them) or YAML/JSON paths; their ``name`` keys
            must differ (the mapping names each taxonomy by it).
        method: "lexical" (TF-IDF + keyword overlap, offline), "embedding" (sentence-transformers
            from ``embedding_model``, a local path) or "llm" (the client picks the entry).
        labeler: "offline" (label from the description's top terms) or "llm".
        top_k: Taxonomy entries kept per latent and taxonomy.
    """

    taxonomies: list[str] = field(default_factory=lambda: ["mmlu"])
    method: str = "lexical"
    labeler: str = "offline"
    top_k: int = 3
    embedding_model: str | None = None
    client: ClientConfig = field(default_factory=ClientConfig)

    def __post_init__(self) -> None:
        if isinstance(self.client, dict):
            self.client = ClientConfig.from_dict(self.client)
        require(self.method in MAPPERS, f"method must be one of {MAPPERS}, got {self.method!r}.")
        require(self.labeler in LABELERS, f"labeler must be one of {LABELERS}, got {self.labeler!r}.")
        require(self.top_k >= 1, "top_k must be >= 1.")
        require(bool(self.taxonomies), "taxonomies must name at least one taxonomy.")
        require(
            self.method != "embedding" or bool(self.embedding_model),
            "method 'embedding' needs embedding_model (a local sentence-transformers folder).",
        )
        require(
            not self.calls_llm or self.client.kind != "none",
            "method/labeler 'llm' need an LLM client: set client.kind to 'openai' or 'vllm' "
            "(`--client` on the command line).",
        )
        require(
            self.client.kind in MAP_CLIENTS,
            f"client.kind {self.client.kind!r} cannot label or rank categories (map takes {', '.join(MAP_CLIENTS)}; "
            "'stub', the offline stand-in of smoke runs, answers a hash of the prompt): use method 'lexical' / "
            "labeler 'offline' without an LLM, or client kind 'openai' or 'vllm'.",
        )

    @property
    def calls_llm(self) -> bool:
        """Whether the mapping asks the LLM client (method or labeler ``llm``)."""
        return "llm" in (self.method, self.labeler)


# What a folder SentenceTransformer loads holds: its modules (a sentence-transformers save), or a plain
# transformers model's config.json (loaded with mean pooling).
EMBEDDING_MODEL_FILES = ("modules.json", "config.json")


def embedding_model_problem(model_path: str) -> str | None:
    """Why ``model_path`` cannot be the embedding mapper's model, seen without loading it: not a local folder
    (no downloads are made, a hub id included), or a folder without a model's files; None when it may be one."""
    path = Path(model_path)
    if not path.is_dir():
        what = "it does not exist" if not path.exists() else "it is a file"
        return (f"{model_path} is not a local folder ({what}): give a sentence-transformers model folder (the "
                "embedding mapper makes no downloads; for a hub model, download it first, e.g. `huggingface-cli "
                "download ORG/NAME --local-dir DIR`, and give DIR).")
    if not any((path / name).is_file() for name in EMBEDDING_MODEL_FILES):
        content = "is empty" if not any(path.iterdir()) else f"holds neither {' nor '.join(EMBEDDING_MODEL_FILES)}"
        return (f"the folder {model_path} {content}: expected a sentence-transformers model folder, e.g. one "
                "written by SentenceTransformer.save (modules.json, config.json, weights, tokenizer).")
    return None
