"""Explaining latents: an offline explainer (no LLM) and Delphi's explainers through our clients.

Output, in the run directory: ``explanations.parquet`` + ``explanations.csv`` (one row per latent:
``latent``, ``explanation``, ``explainer``, ``model``, ``terms``, ``n_top``, ``fire_tokens``, and a
column per Delphi scorer run: ``detection`` / ``fuzz`` accuracy), each written atomically. An LLM
client's answers are cached in ``<cache_dir>/llm_cache/`` (``mneme run``: the run's ``cache/explain/``,
kept when the stage is redone; ``mneme explain``: the output folder).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.interpret.config import DELPHI_EXPLAINERS, ExplainConfig
from mneme_plugin.interpret.contexts import LatentContexts, iter_records_delphi, load_contexts
from mneme_plugin.interpret.files import EXPLANATIONS_CSV, EXPLANATIONS_PARQUET, EXPLANATIONS_STEM, TOKENIZER_DIR, write_table

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
    """The tokenizer saved by ``collect`` (``<dir>/tokenizer``), unless one is given."""
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            from mneme_plugin.activations.models import hub_cache_when_unreachable

            with hub_cache_when_unreachable(str(tokenizer)):
                return AutoTokenizer.from_pretrained(str(tokenizer))
        return tokenizer
    path = Path(contexts_dir) / TOKENIZER_DIR
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist: pass the tokenizer (the base model's) explicitly.")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


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


def _accuracy(score: Any) -> float:
    try:
        outputs = list(score)
        flags = [bool(o.correct) for o in outputs if getattr(o, "prediction", None) is not None]
        return float(np.mean(flags)) if flags else float("nan")
    except TypeError:
        return float("nan")


async def _run_delphi(records: list[Any], explainer: Any, scorers: dict[str, Any], concurrency: int,
                     progress: bool = True) -> list[dict[str, Any]]:
    from mneme_plugin.interpret.clients import gather_with_progress

    sem = asyncio.Semaphore(concurrency)

    async def one(record: Any) -> dict[str, Any]:
        async with sem:
            result = await explainer(record)
            record.explanation = result.explanation
            row = {"latent": int(record.latent.latent_index), "explanation": result.explanation}
            for name, scorer in scorers.items():
                scored = await scorer(record)
                row[name] = _accuracy(scored.score)
            return row

    return await gather_with_progress([one(r) for r in records], "explain", progress)


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
    from mneme_plugin.interpret.clients import LLM_CACHE_DIR, as_delphi_client, make_client

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
        from mneme_plugin.interpret.delphi_compat import import_delphi

        explainers = import_delphi("delphi.explainers")
        dclient = as_delphi_client(client)
        cls = getattr(explainers, DELPHI_EXPLAINERS[config.explainer])
        explainer = cls(client=dclient, threshold=config.threshold, temperature=config.temperature)
        scorers: dict[str, Any] = {}
        if config.scorers:
            scorer_mod = import_delphi("delphi.scorers")
            if "detection" in config.scorers:
                scorers["detection"] = scorer_mod.DetectionScorer(dclient, n_examples_shown=5, log_prob=False)
            if "fuzz" in config.scorers:
                scorers["fuzz"] = scorer_mod.FuzzingScorer(dclient, n_examples_shown=5, log_prob=False)
        dataset = iter_records_delphi(
            contexts_dir, tok, latents=chosen,
            constructor={"min_examples": config.min_examples, "n_non_activating": config.n_non_activating},
            sampler={"n_examples_train": config.n_examples, "n_examples_test": config.n_examples_test,
                     "n_quantiles": config.n_quantiles, "train_type": config.train_type},
        )
        concurrency = getattr(client, "concurrency", 8)
        with _OncePerMessage(logging.getLogger("delphi")):  # Delphi warns once per latent
            records = sorted(dataset, key=lambda r: r.latent.latent_index)
            rows = asyncio.run(_run_delphi(records, explainer, scorers, concurrency, progress))
        model = getattr(client, "model", "")
    for row in rows:
        row.setdefault("terms", "[]")
        row["explainer"] = config.explainer
        row["model"] = model
        row["n_top"] = len(info[row["latent"]]["top_rows"])
        row["fire_tokens"] = info[row["latent"]]["fire_tokens"]
    table = pd.DataFrame(rows, columns=None if rows else ["latent", "explanation", "terms", "explainer", "model",
                                                          "n_top", "fire_tokens"])
    table = table.sort_values("latent", kind="stable").reset_index(drop=True)
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
