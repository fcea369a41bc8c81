"""Explaining latents: an offline explainer (no LLM) and Delphi's explainers through our clients.

Output, in the run directory: ``explanations.parquet`` + ``explanations.csv`` (one row per latent:
``latent``, ``explanation``, ``parsed``, ``explainer``, ``model``, ``terms``, ``n_top``, ``fire_tokens``,
and per Delphi scorer run: ``detection`` / ``fuzz`` accuracy, ``<scorer>_scored`` (samples classified)
and ``<scorer>_failed`` (calls that failed)), each written atomically. An LLM client's answers are
cached in ``<cache_dir>/llm_cache/`` (``mneme run``: the run's ``cache/explain/``, kept when the stage is
redone; ``mneme explain``: the output folder).

An explainer answer without Delphi's ``[EXPLANATION]:`` gives the latent no explanation (``parsed``
False, ``explanation`` ""), and its cached answer is dropped so that a rerun asks again; a scorer none of
whose calls gave a reading fails the stage (Delphi's scorers swallow failed calls).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.interpret.clients import ClientError
from mneme_plugin.interpret.config import DELPHI_EXPLAINERS, ExplainConfig
from mneme_plugin.interpret.contexts import LatentContexts, iter_records_delphi, load_contexts
from mneme_plugin.interpret.files import (
    CATEGORIES_STEM,
    EXPLANATIONS_CSV,
    EXPLANATIONS_PARQUET,
    EXPLANATIONS_STEM,
    TOKENIZER_DIR,
    remove_table,
    write_table,
)

logger = logging.getLogger("mneme_plugin")


class _OncePerMessage(logging.Filter):
    """While active on ``target``, each distinct message passes once; the repeats are counted and
    summed up in one line at the end (Delphi logs the same warning for every latent it concerns)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target, self.counts = target, Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        self.counts[message] += 1
        return self.counts[message] == 1

    def __enter__(self) -> "_OncePerMessage":
        self.target.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.target.removeFilter(self)
        for message, count in self.counts.items():
            if count > 1:
                self.target.warning("(%d times in all) %s", count, message)

def load_tokenizer(contexts_dir: str | os.PathLike[str], tokenizer: Any = None) -> Any:
    """The tokenizer saved by ``collect`` (``<dir>/tokenizer``), unless one is given (an object, a folder or a
    hub name). A tokenizer that cannot be loaded is a ConfigError naming it (a CheckpointError for the saved one)."""
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from mneme_plugin.activations.models import ModelSpec, hub_cache_when_unreachable, require_hub_model

            name = str(tokenizer)
            spec = ModelSpec.parse(name)
            if spec.kind == "local" and not Path(spec.location).exists():
                raise ConfigError(f"The tokenizer folder {name} does not exist (and it is no hub name of the form "
                                  "org/name): give the base model's folder or its tokenizer's.")
            if spec.kind == "hub":
                require_hub_model(name, f"The tokenizer {name}")
            with hub_cache_when_unreachable(name):
                return _auto_tokenizer(name, ConfigError, "give a tokenizer folder (the base model's, or one written "
                                       "by save_pretrained) or a hub model name")
        return tokenizer
    path = Path(contexts_dir) / TOKENIZER_DIR
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist: pass the tokenizer (the base model's) explicitly.")
    return _auto_tokenizer(str(path), CheckpointError, "collect again (`mneme collect`), or pass the tokenizer "
                           "(the base model's) explicitly")


def _auto_tokenizer(name: str, error: type[Exception], remedy: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError) as err:  # transformers' errors name its files, not the remedy
        first = str(err).splitlines()[0] if str(err) else ""
        raise error(f"{name} could not be loaded as a tokenizer ({type(err).__name__}: {first}): {remedy}.") from err


# --------------------------------------------------------------------------------- offline


@dataclass
class OfflineExplanation:
    latent: int
    explanation: str
    terms: list[str]
    phrases: list[str]
    context_terms: list[str] = field(default_factory=list)


class OfflineExplainer:
    """Characteristic tokens and bigrams of a latent's top contexts, without an LLM.

    Foreground: tokens at activating positions (activation > ``threshold`` x the context's max)
    of the top ``n_examples`` contexts. Background: the corpus token counts gathered by
    ``collect``. Tokens are ranked by the log-odds ratio with an informative Dirichlet prior
    (Monroe, Colaresi & Quinn 2008), z-scored; bigrams (previous token + activating token, and
    activating token + next token) seen in at least two contexts and containing a top token are
    listed as phrases.

    With ``n_context_terms`` > 0 it also lists the words that characterise the top contexts around
    the activations (every non-activating token of a context, counted once per context, ranked the
    same way, kept when seen in at least a ``min_context_share`` of the contexts): what an LLM
    explainer reads from the whole context. A latent that fires on a neutral token (``sorry``,
    ``.``) in contexts about one subject is then described by that subject as well.
    """

    def __init__(self, tokenizer: Any, n_examples: int = 20, n_terms: int = 5, threshold: float = 0.3,
                 prior: float = 100.0, n_context_terms: int = 0, min_context_share: float = 0.2) -> None:
        self.tokenizer, self.n_examples, self.n_terms = tokenizer, n_examples, n_terms
        self.threshold, self.prior = threshold, prior
        self.n_context_terms, self.min_context_share = n_context_terms, min_context_share
        self.skip = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None}

    def _word(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)]).strip()

    def explain_examples(self, latent: int, tokens: torch.Tensor, acts: torch.Tensor,
                         background: np.ndarray) -> OfflineExplanation:
        tokens, acts = tokens[: self.n_examples], acts[: self.n_examples]
        fg: Counter[int] = Counter()
        around: Counter[int] = Counter()
        bigrams: dict[tuple[int, int], set[int]] = {}
        n_contexts = 0
        for r in range(tokens.shape[0]):
            peak = float(acts[r].max())
            if peak <= 0:
                continue
            n_contexts += 1
            positions = (acts[r] > self.threshold * peak).nonzero().flatten().tolist()
            if self.n_context_terms > 0:
                around.update(set(tokens[r].tolist()) - {int(tokens[r, p]) for p in positions} - self.skip)
            for p in positions:
                t = int(tokens[r, p])
                if t in self.skip:
                    continue
                fg[t] += 1
                for a, b in ((p - 1, p), (p, p + 1)):
                    if 0 <= a and b < tokens.shape[1]:
                        pair = (int(tokens[r, a]), int(tokens[r, b]))
                        if not (set(pair) & self.skip):
                            bigrams.setdefault(pair, set()).add(r)
        if not fg:
            return OfflineExplanation(latent, "No activating tokens in the collected contexts.", [], [])
        vocab = max(max(fg) + 1, max(around, default=0) + 1, len(background))
        bg = np.zeros(vocab, dtype=np.float64)
        bg[: len(background)] = background
        if bg.sum() == 0:
            bg[: tokens.max() + 1] += np.bincount(tokens.flatten().numpy(), minlength=int(tokens.max()) + 1)
        scores = self._log_odds(fg, bg)
        ranked = sorted(scores, key=lambda t: (-scores[t], -fg[t], t))
        top = [t for t in ranked if self._word(t)][: self.n_terms]
        terms = [self._word(t) for t in top]
        top_set = set(top)
        phrase_ids = sorted((p for p, rows in bigrams.items() if len(rows) >= 2 and set(p) & top_set),
                            key=lambda p: (-len(bigrams[p]), p))[:3]
        phrases = [f"{self._word(a)} {self._word(b)}" for a, b in phrase_ids]
        text = "Tokens " + ", ".join(f'"{w}"' for w in terms)
        if phrases:
            text += "; phrases " + ", ".join(f'"{p}"' for p in phrases)
        context_terms: list[str] = []
        if self.n_context_terms > 0:
            common = Counter({t: c for t, c in around.items() if c >= self.min_context_share * n_contexts
                              and t not in top_set})
            context_scores = self._log_odds(common, bg)
            ranked = sorted((t for t in context_scores if context_scores[t] > 0),
                            key=lambda t: (-context_scores[t], -common[t], t))
            context_terms = [w for w in (self._word(t) for t in ranked) if w][: self.n_context_terms]
            if context_terms:
                text += "; in contexts with " + ", ".join(f'"{w}"' for w in context_terms)
        return OfflineExplanation(latent, text, terms, phrases, context_terms)

    def _log_odds(self, counts: Counter[int], background: np.ndarray) -> dict[int, float]:
        """Z-scored log-odds ratio of each token's share of ``counts`` against its share of the
        corpus ``background``, with the informative Dirichlet prior (Monroe et al. 2008)."""
        alpha = self.prior * (background + 1.0) / (background + 1.0).sum()
        a0 = alpha.sum()
        n_fg, n_bg = sum(counts.values()), background.sum()
        scores = {}
        for t, y in counts.items():
            d = math.log((y + alpha[t]) / (n_fg + a0 - y - alpha[t])) - math.log(
                (background[t] + alpha[t]) / (n_bg + a0 - background[t] - alpha[t]))
            scores[t] = d / math.sqrt(1.0 / (y + alpha[t]) + 1.0 / (background[t] + alpha[t]))
        return scores

    def explain(self, contexts: LatentContexts, latent: int) -> OfflineExplanation:
        tokens, acts, _ = contexts.top_examples(latent)
        return self.explain_examples(latent, tokens, acts, contexts.background)


# --------------------------------------------------------------------------------- Delphi


# Delphi 0.1.3's explainers return this (or nothing after the marker) for an answer without "[EXPLANATION]:".
UNPARSED = "Explanation could not be parsed."
# Whether a latent's explainer answer held an explanation (False: explanation "", not mapped, no evidence).
PARSED_COLUMN = "parsed"


class _Calls:
    """A Delphi client for one latent's explainer or one of its scorers: forwards to the shared client and
    keeps what Delphi does not report: each request, each answer's text and each failed call's error
    (Delphi's scorers catch those and log one line)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.model = inner, getattr(inner, "model", "")
        self.requests: list[tuple[Any, dict[str, Any]]] = []
        self.answers: list[str] = []
        self.errors: list[Exception] = []

    async def generate(self, prompt: Any, **kwargs: Any) -> Any:
        self.requests.append((prompt, kwargs))
        try:
            out = await self.inner.generate(prompt, **kwargs)
        except Exception as err:
            self.errors.append(err)
            raise
        self.answers.append(getattr(out, "text", out))
        return out


@dataclass
class _Tally:
    """What the Delphi run reports at its end, over all latents."""

    unparsed: dict[int, str] = field(default_factory=dict)  # latent -> the explainer's answer
    forgotten: int = 0  # unparsed answers dropped from the client's cache
    calls: Counter[str] = field(default_factory=Counter)  # per scorer
    failed: Counter[str] = field(default_factory=Counter)
    scored: Counter[str] = field(default_factory=Counter)  # samples classified
    first_error: dict[str, str] = field(default_factory=dict)
    an_answer: dict[str, str] = field(default_factory=dict)


@dataclass
class _Delphi:
    """Delphi's explainer and scorers, made afresh for each latent: each gets its own recording client, and
    each scorer its own RNG seeded by the seed, the scorer and the latent. (Delphi's scorers shuffle a
    latent's samples with one RNG shared by all latents, drawn from in the order the latents finish: at
    concurrency > 1 a rerun sent other prompts, missed the cache and scored differently.)"""

    client: Any
    explainer: Any  # client -> Delphi explainer
    scorers: dict[str, Any]  # name -> (client -> Delphi scorer)
    seed: int
    forget: Any = None  # the client's forget(prompt, **kwargs), when it caches answers
    tally: _Tally = field(default_factory=_Tally)


def _outputs(score: Any) -> list[Any]:
    try:
        return list(score)
    except TypeError:
        return []


async def _score(record: Any, name: str, make: Any, delphi: _Delphi) -> dict[str, Any]:
    calls = _Calls(delphi.client)
    scorer = make(calls)
    scorer.rng = random.Random(f"{delphi.seed}/{name}/{int(record.latent.latent_index)}")  # see _Delphi
    outputs = _outputs((await scorer(record)).score)
    flags = [bool(o.correct) for o in outputs if getattr(o, "prediction", None) is not None]
    tally = delphi.tally
    tally.calls[name] += len(calls.requests)
    tally.failed[name] += len(calls.errors)
    tally.scored[name] += len(flags)
    if calls.errors:
        tally.first_error.setdefault(name, f"{type(calls.errors[0]).__name__}: {calls.errors[0]}")
    if calls.answers:
        tally.an_answer.setdefault(name, calls.answers[0])
    return {name: float(np.mean(flags)) if flags else float("nan"), f"{name}_scored": len(flags),
            f"{name}_failed": len(calls.errors)}


async def _explain_latent(record: Any, delphi: _Delphi) -> dict[str, Any]:
    from mneme_plugin.interpret.delphi_compat import with_non_activating_levels

    latent = int(record.latent.latent_index)
    calls = _Calls(delphi.client)
    result = await delphi.explainer(calls)(with_non_activating_levels(record))
    explanation = result.explanation.strip()
    if not explanation or explanation == UNPARSED:
        delphi.tally.unparsed[latent] = calls.answers[-1] if calls.answers else ""
        if delphi.forget is not None and calls.requests:  # a rerun asks again rather than reading it back
            prompt, kwargs = calls.requests[-1]
            delphi.tally.forgotten += bool(delphi.forget(prompt, **kwargs))
        row: dict[str, Any] = {"latent": latent, "explanation": "", PARSED_COLUMN: False}
        for name in delphi.scorers:  # nothing to score
            row.update({name: float("nan"), f"{name}_scored": 0, f"{name}_failed": 0})
        return row
    record.explanation = result.explanation
    row = {"latent": latent, "explanation": result.explanation, PARSED_COLUMN: True}
    for name, make in delphi.scorers.items():
        row.update(await _score(record, name, make, delphi))
    return row


async def _run_delphi(records: list[Any], delphi: _Delphi, concurrency: int,
                     progress: bool = True) -> list[dict[str, Any]]:
    from mneme_plugin.interpret.clients import gather_with_progress

    sem = asyncio.Semaphore(concurrency)

    async def one(record: Any) -> dict[str, Any]:
        async with sem:
            return await _explain_latent(record, delphi)

    return await gather_with_progress([one(r) for r in records], "explain", progress)


def _short(text: str, n: int = 200) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _report_unparsed(tally: _Tally, n_latents: int) -> None:
    if not tally.unparsed:
        return
    latent, answer = next(iter(sorted(tally.unparsed.items())))
    dropped = f" ({tally.forgotten} dropped from the LLM cache)" if tally.forgotten else ""
    logger.warning("%d of %d latents got an explainer answer without '[EXPLANATION]:' (latent %d: %s): they have no "
                   "explanation (column %s False), are not mapped and are no evidence; running explain again asks "
                   "for those answers again%s.", len(tally.unparsed), n_latents, latent, _short(answer), PARSED_COLUMN,
                   dropped)


def _check_scorers(tally: _Tally) -> None:
    """Refuse a scorer none of whose calls gave a reading (Delphi's scorers swallow failed calls, leaving
    NaN); warn about the calls that failed when others did not."""
    for name, calls in tally.calls.items():
        failed, error = tally.failed[name], tally.first_error.get(name, "")
        if calls and not tally.scored[name]:
            why = (f"{failed} of {calls} calls failed (first error: {error})" if failed
                   else f"no answer could be read (e.g. {_short(tally.an_answer.get(name, ''))})")
            raise ClientError(f"The {name} scorer scored no sample: {why}. The explanations are in the LLM cache: "
                              f"fix the endpoint and run explain again, or drop the {name} scorer.")
        if failed:
            logger.warning("%d of %d %s scorer calls failed (first error: %s): those latents' %s is over fewer samples "
                           "(columns %s_scored, %s_failed).", failed, calls, name, error, name, name, name)


def _explain_delphi(contexts_dir: Path, tok: Any, chosen: list[int], config: ExplainConfig, client: Any,
                    progress: bool) -> list[dict[str, Any]]:
    """Rows of Delphi's explainer (and scorers) through ``client``; see :class:`_Delphi`."""
    from mneme_plugin.interpret.clients import as_delphi_client
    from mneme_plugin.interpret.delphi_compat import import_delphi

    explainers = import_delphi("delphi.explainers")
    cls = getattr(explainers, DELPHI_EXPLAINERS[config.explainer])
    makers: dict[str, Any] = {}
    if config.scorers:
        scorer_mod = import_delphi("delphi.scorers")
        classes = {"detection": scorer_mod.DetectionScorer, "fuzz": scorer_mod.FuzzingScorer}
        makers = {name: (lambda c, k=classes[name]: k(c, n_examples_shown=5, log_prob=False))
                  for name in config.scorers}
    delphi = _Delphi(client=as_delphi_client(client),
                     explainer=lambda c: cls(client=c, threshold=config.threshold, temperature=config.temperature),
                     scorers=makers, seed=config.seed, forget=getattr(client, "forget", None))
    dataset = iter_records_delphi(
        contexts_dir, tok, latents=chosen,
        constructor={"min_examples": config.min_examples, "n_non_activating": config.n_non_activating},
        sampler={"n_examples_train": config.n_examples, "n_examples_test": config.n_examples_test,
                 "n_quantiles": config.n_quantiles, "train_type": config.train_type},
    )
    concurrency = getattr(client, "concurrency", 8)
    with _OncePerMessage(logging.getLogger("delphi")):  # Delphi warns once per latent
        records = sorted(dataset, key=lambda r: r.latent.latent_index)
        rows = asyncio.run(_run_delphi(records, delphi, concurrency, progress))
    _report_unparsed(delphi.tally, len(rows))
    _check_scorers(delphi.tally)
    return rows


def explain(
    contexts_dir: str | os.PathLike[str],
    config: Any,
    out_dir: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    client: Any = None,
    latents: list[int] | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Explain the collected latents of ``contexts_dir`` (see module docstring); returns the table.

    ``client`` overrides ``config.client`` (any :class:`~mneme_plugin.interpret.clients.Client`
    or a Delphi client). Delphi explainers need Delphi installed (``pip install eai-delphi``);
    ``progress``: a bar over their latents. ``cache_dir``: where the client made from ``config.client``
    caches its answers (in ``llm_cache/``; default ``out_dir``; ``client.cache_dir`` wins).
    """
    from mneme_plugin.interpret.clients import LLM_CACHE_DIR, make_client

    config = ExplainConfig.of(config)
    contexts_dir = Path(contexts_dir)
    out_dir = Path(out_dir) if out_dir is not None else contexts_dir
    contexts = load_contexts(contexts_dir)
    tok = load_tokenizer(contexts_dir, tokenizer)
    chosen = list(contexts.latents if latents is None else latents)
    info = {p["latent"]: p for p in contexts.per_latent}
    not_collected = sorted(set(chosen) - set(info))
    if not_collected:
        raise ConfigError(f"Latent(s) {not_collected[:10]} were not collected in {contexts_dir} ({len(info)} were): "
                          "explain collected latents only, or collect those first (collect.latents).")
    rows: list[dict[str, Any]] = []
    if not config.calls_llm:
        ex = OfflineExplainer(tok, config.n_examples, config.n_terms, config.threshold,
                              n_context_terms=config.n_context_terms)
        for latent in chosen:
            n_top = len(info[latent]["top_rows"])
            if n_top < config.min_examples:
                continue
            e = ex.explain(contexts, latent)
            rows.append({"latent": latent, "explanation": e.explanation,
                         "terms": json.dumps(e.terms + e.phrases + e.context_terms)})
        model = "offline"
    else:
        if client is None:
            cache = Path(cache_dir) if cache_dir is not None else out_dir
            client = make_client(config.client, default_cache_dir=cache / LLM_CACHE_DIR)
        if client is None:
            raise ConfigError(f"explainer {config.explainer!r} needs an LLM client (client.kind openai or vllm; stub for smoke runs).")
        rows = _explain_delphi(contexts_dir, tok, chosen, config, client, progress)
        model = getattr(client, "model", "")
    for row in rows:
        row.setdefault(PARSED_COLUMN, True)
        row.setdefault("terms", "[]")
        row["explainer"] = config.explainer
        row["model"] = model
        row["n_top"] = len(info[row["latent"]]["top_rows"])
        row["fire_tokens"] = info[row["latent"]]["fire_tokens"]
    table = pd.DataFrame(rows, columns=None if rows else ["latent", "explanation", PARSED_COLUMN, "terms", "explainer",
                                                          "model", "n_top", "fire_tokens"])
    table = table.sort_values("latent", kind="stable").reset_index(drop=True)
    # A mapping beside the explanations (`mneme map` writes next to them by default) maps the earlier ones: it goes,
    # so `mneme info` and `map`'s readers do not take it for these explanations' (as collect clears both).
    if remove_table(out_dir, CATEGORIES_STEM):
        logger.info("Removed the mapping of the earlier explanations in %s (it maps those explanations).", out_dir)
    write_table(table, out_dir, EXPLANATIONS_STEM)
    return table


def load_explanations(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The explanations table ``explain`` wrote (``latent``, ``explanation``, and the scorers' columns): from an
    explanations folder (its parquet, else its CSV) or one such file."""
    path = Path(path)
    for name, reader in ((EXPLANATIONS_PARQUET, pd.read_parquet), (EXPLANATIONS_CSV, pd.read_csv)):
        if (path / name).is_file():
            return reader(path / name)
    if path.is_file():
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    raise CheckpointError(f"{path} holds no explanations ({EXPLANATIONS_PARQUET}); run `mneme explain` first.")


def has_explanation(table: pd.DataFrame) -> pd.Series:
    """Which rows of an explanations table hold an explanation: not an unparsed answer (``parsed`` False, or
    Delphi's placeholder in tables written before that column) and not empty (the CSV reads "" as NaN)."""
    text = table["explanation"]
    # UNPARSED: what tables written before the column hold for such an answer
    present = text.notna() & ~text.astype(str).str.strip().isin(["", UNPARSED])
    if PARSED_COLUMN in table:
        present &= table[PARSED_COLUMN].fillna(False).astype(bool)
    return present
