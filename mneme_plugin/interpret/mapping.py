"""Map latent descriptions to categories: a short free label, and the nearest taxonomy entries.

Methods (``MapConfig.method``); none ever sees ground truth:

* ``lexical`` (offline): TF-IDF cosine between the description (+ label) and each entry's
  name + description + keywords (keywords counted twice), IDF over the taxonomy's entries.
* ``embedding``: cosine of sentence-transformers embeddings from a *local* model folder
  (``embedding_model``); raises a clear error if sentence-transformers or the folder is missing.
* ``llm``: the client ranks the entries (prompted with their ids and names); score 1/rank.

Labels (``MapConfig.labeler``): ``offline`` (the description's most characteristic terms: quoted
terms first, else the most frequent content words) or ``llm`` (a 1-4 word label, as in the paper).

Output: ``categories.parquet`` + ``categories.csv``: one row per (latent, taxonomy) with
``latent, description, label, taxonomy, category, score, top_k`` (JSON list of [id, score]),
written atomically. A latent without an explanation (its explainer answer could not be parsed) has no
row: it has no category and is no evidence for any.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.interpret.config import MapConfig, embedding_model_problem
from mneme_plugin.interpret.files import CATEGORIES_PARQUET, CATEGORIES_STEM, write_table
from mneme_plugin.interpret.taxonomy import Taxonomy, load_taxonomy

logger = logging.getLogger("mneme_plugin")

MAPPING_COLUMNS = ("latent", "description", "label", "taxonomy", "category", "score", "top_k")
LINK_COLUMNS = ("latent", "category", "similarity")

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an the of and or to in on at for with by from as is are was were be been it its this that these those "
    "tokens token phrases phrase fires fire activates activating on words word text about such e g eg like "
    "related mentions mention context contexts latent feature".split()
)


def words(text: str) -> list[str]:
    out = []
    for w in _WORD.findall(text.lower()):
        if w in STOPWORDS or len(w) < 2:
            continue
        out.append(w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def offline_label(description: str, n: int = 3) -> str:
    quoted = re.findall(r'"([^"]+)"', description)
    terms: list[str] = []
    for q in quoted:
        for w in words(q):
            if w not in terms:
                terms.append(w)
    if not terms:
        terms = [w for w, _ in Counter(words(description)).most_common()]
    return " / ".join(terms[:n]) if terms else "unlabelled"


class LexicalMapper:
    """TF-IDF cosine between descriptions and taxonomy entries (see module docstring)."""

    def __init__(self, taxonomy: Taxonomy) -> None:
        self.taxonomy = taxonomy
        docs = [words(" ".join([e.name, e.description, *e.keywords, *e.keywords])) for e in taxonomy.entries]
        self.vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
        df = np.zeros(len(self.vocab))
        for d in docs:
            for w in set(d):
                df[self.vocab[w]] += 1
        self.idf = np.log((1 + len(docs)) / (1 + df)) + 1.0
        self.matrix = np.stack([self._vec(d) for d in docs])

    def _vec(self, toks: list[str]) -> np.ndarray:
        v = np.zeros(len(self.vocab))
        for w, c in Counter(toks).items():
            if w in self.vocab:
                v[self.vocab[w]] = (1 + math.log(c)) * self.idf[self.vocab[w]]
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def scores(self, text: str) -> np.ndarray:
        return self.matrix @ self._vec(words(text))


class EmbeddingMapper:
    """Cosine similarity of sentence-transformers embeddings (local model folder only)."""

    def __init__(self, taxonomy: Taxonomy, model_path: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ConfigError("method 'embedding' needs sentence-transformers (`pip install sentence-transformers`).") from err
        problem = embedding_model_problem(model_path)
        if problem:
            raise ConfigError(f"embedding_model: {problem}")
        from safetensors import SafetensorError

        self.taxonomy = taxonomy
        try:
            self.model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            # transformers' own errors name files inside the folder, not what the folder should be.
            raise ConfigError(
                f"embedding_model: {model_path} could not be loaded as a sentence-transformers model "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): it must be a model "
                "folder written by SentenceTransformer.save (modules.json, config.json, weights and "
                "tokenizer files), or a transformers model folder (config.json, weights, tokenizer).") from err
        self.matrix = self.model.encode([e.text for e in taxonomy.entries], normalize_embeddings=True)

    def scores(self, text: str) -> np.ndarray:
        return self.matrix @ self.model.encode([text], normalize_embeddings=True)[0]


LABEL_PROMPT = (
    "Here is a description of when a feature of a language model activates:\n\n{description}\n\n"
    "Give a short label (1 to 4 words) naming the topic or behaviour. Answer with the label only."
)
MAP_PROMPT = (
    "A feature of a language model is described as:\n\n{description}\n\nWhich of these categories does it "
    "belong to?\n{entries}\n\nAnswer with the ids of the {k} best matching categories, best first, "
    "separated by commas, and nothing else."
)


# How the LLM's answers are read. Chat models rarely answer with the bare comma-separated ids asked for:
# they number or bullet them, change their case, separate them by semicolons or lines, add a note in
# parentheses or open with a sentence. An id read wrong is not a near miss: it leaves the latent without
# a category, or (dropping the answer's first id) promotes its second, so every such shape is read here and
# an answer read as nothing is counted and shown (``map_descriptions``).
_ITEM_MARK = re.compile(r"^(?:#?\d+[.):]\s*|#\d+\s+|[-*\u2022\u2013]\s*)")
_NOTE = re.compile(r"\s*(?:\([^()]*\)|\[[^\[\]]*\])")
_QUOTES = "`'\"\u201c\u201d\u2018\u2019*_"
_PREAMBLE = re.compile(r"^(?:sure|certainly|of course|okay|ok|here(?: is|'s| are)|the (?:best|most)|"
                       r"i (?:would|'d) (?:say|suggest|choose))\b", re.IGNORECASE)
_LABEL_PREFIX = re.compile(r"^(?:the\s+)?(?:short\s+)?label\s*(?:is\s*)?[:\-]\s*", re.IGNORECASE)


def _normal(text: str) -> str:
    """An id or answer item as compared: lower case, spaces, hyphens and underscores one underscore."""
    return re.sub(r"[\s_\-]+", "_", text.strip().lower()).strip("_")


def _clean_item(text: str) -> str:
    """One item of an answer without its numbering or bullet, quotes and markdown, and trailing dots."""
    text = text.strip()
    for _ in range(2):  # "1. **law**", "- 1) law"
        text = _ITEM_MARK.sub("", text).strip().strip(_QUOTES).strip()
    return text.rstrip(".!").strip().strip(_QUOTES).strip()


def _answer_lines(text: str) -> list[str]:
    """The lines of an answer that hold it: a line that only introduces it ("Sure! Here is a label:",
    "Here are the categories:") is left out, and one that introduces it before a colon keeps what follows."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.endswith(":"):
            continue
        if _PREAMBLE.match(line):
            if ":" not in line:
                continue
            line = line.split(":", 1)[1].strip()
        lines.append(line)
    return lines


def parse_label(text: str) -> str | None:
    """The label in an LLM's answer: its first line that is not a preamble, without a ``Label:`` prefix,
    numbering, quotes or markdown (None when no line is left)."""
    for line in _answer_lines(text):
        label = _clean_item(_LABEL_PREFIX.sub("", line))
        if label:
            return label[:80]
    return None


def parse_ranking(text: str, taxonomy: Taxonomy, k: int) -> list[tuple[str, float]]:
    """The taxonomy entries an LLM's answer names, in its order, as (id, 1 / position): an item is the id
    of an entry (or its name) after normalisation (``_normal``), never a near one; an item that names none
    keeps its position, so the entries after it are not promoted. At most ``k`` entries."""
    exact: dict[str, str] = {}
    clashes: set[str] = set()
    for entry in taxonomy.entries:  # ids first: a name equal to another entry's id does not take it
        key = _normal(entry.id)
        if key in exact:
            clashes.add(key)
        exact.setdefault(key, entry.id)
    for entry in taxonomy.entries:
        exact.setdefault(_normal(entry.name), entry.id)
    for key in clashes:  # two ids that differ only in case or separators: only the literal id names one
        exact.pop(key, None)

    def entry_of(item: str) -> str | None:
        return item if item in taxonomy.by_id else exact.get(_normal(item))

    items: list[str] = []
    for line in _answer_lines(text):
        for part in re.split(r"[,;]", _NOTE.sub("", line)):
            item = _clean_item(part)
            if item and item not in items:
                items.append(item)
    found: list[tuple[str, float]] = []
    for position, item in enumerate(items):
        eid = entry_of(item)
        if eid is None:  # "law: Law" as the prompt lists the entries, "law - courts and judges"
            head = re.split(r":|\s[-\u2013\u2014]\s", item, maxsplit=1)[0]
            eid = entry_of(_clean_item(head)) if head != item else None
        if eid is not None and eid not in (e for e, _ in found):
            found.append((eid, 1.0 / (position + 1)))
    return found[:k]


async def _llm_label(client: Any, description: str) -> str:
    out = await client.generate(LABEL_PROMPT.format(description=description), temperature=0.0)
    return parse_label(out.text) or "unlabelled"


async def _llm_rank(client: Any, taxonomy: Taxonomy, description: str, k: int) -> tuple[list[tuple[str, float]], str]:
    """The ranked entries and the LLM's answer (shown when it names none)."""
    entries = "\n".join(f"- {e.id}: {e.name}" + (f" ({e.description})" if e.description else "") for e in taxonomy.entries)
    out = await client.generate(MAP_PROMPT.format(description=description, entries=entries, k=k), temperature=0.0)
    return parse_ranking(out.text, taxonomy, k), out.text


def _warn_unmatched(taxonomy: str, answers: list[str], ranked: list[list[tuple[str, float]]]) -> int:
    """Log how many of the LLM's answers named no entry of ``taxonomy``, with one of them; the count."""
    empty = [text for text, top in zip(answers, ranked) if not top]
    if empty:
        logger.warning("map (%s): %d of %d LLM answers named no category of the taxonomy, so those latents have "
                       "none; e.g. %r. Check the client's model (it must answer with the listed ids).",
                       taxonomy, len(empty), len(answers), empty[0][:200])
    return len(empty)


def map_descriptions(
    explanations: pd.DataFrame | str | os.PathLike[str],
    config: Any,
    out_dir: str | os.PathLike[str] | None = None,
    client: Any = None,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Label each description and rank the entries of each taxonomy; write ``categories.*``.
    ``progress``: a bar over the LLM calls (``llm`` method or labeler). ``cache_dir``: where the client
    made from ``config.client`` caches its answers (in ``llm_cache/``; default ``out_dir``, none without
    one; ``client.cache_dir`` wins; ``mneme run``: the run's ``cache/map/``, kept when the stage is redone)."""
    from mneme_plugin.interpret.clients import LLM_CACHE_DIR, gather_with_progress, make_client
    from mneme_plugin.interpret.explain import has_explanation, load_explanations

    config = MapConfig.of(config)
    table = explanations if isinstance(explanations, pd.DataFrame) else load_explanations(explanations)
    if not {"latent", "explanation"} <= set(table.columns):
        raise ConfigError(f"The explanations need columns latent and explanation; got {list(table.columns)}.")
    explained = has_explanation(table)
    if not explained.all():  # an unparsed answer describes nothing: no category, so it is no evidence
        logger.warning("%d latent(s) without an explanation (unparsed explainer answers) are not mapped.",
                    int((~explained).sum()))
        table = table[explained]
    taxonomies = [load_taxonomy(t) for t in config.taxonomies]
    names = [tax.name for tax in taxonomies]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # the mapping's rows name their taxonomy by it: two would be read as one
        raise ConfigError(f"map.taxonomies {config.taxonomies} holds taxonomies of the same name {repeated}: the mapping "
                          "names each taxonomy by its `name` key; give the files different names.")
    needs_llm = config.calls_llm
    if needs_llm and client is None:
        folder = cache_dir if cache_dir is not None else out_dir
        cache = Path(folder) / LLM_CACHE_DIR if folder is not None else None
        client = make_client(config.client, default_cache_dir=cache)
    if needs_llm and client is None:
        raise ConfigError("method/labeler 'llm' need an LLM client.")
    descriptions = [str(d) for d in table["explanation"]]
    latents = [int(v) for v in table["latent"]]

    if config.labeler == "llm":
        async def all_labels() -> list[str]:
            return await gather_with_progress([_llm_label(client, d) for d in descriptions], "label", progress)
        labels = asyncio.run(all_labels())
    else:
        labels = [offline_label(d) for d in descriptions]

    rows = []
    for tax in taxonomies:
        if config.method == "llm":
            async def all_ranks(tax: Taxonomy = tax) -> list[tuple[list[tuple[str, float]], str]]:
                return await gather_with_progress([_llm_rank(client, tax, d, config.top_k) for d in descriptions],
                                                  f"map ({tax.name})", progress)
            answered = asyncio.run(all_ranks())
            ranked = [top for top, _ in answered]
            _warn_unmatched(tax.name, [text for _, text in answered], ranked)
        else:
            mapper = EmbeddingMapper(tax, config.embedding_model) if config.method == "embedding" else LexicalMapper(tax)
            ranked = []
            for d, label in zip(descriptions, labels):
                s = mapper.scores(f"{d} {label}")
                order = np.argsort(-s, kind="stable")[: config.top_k]
                ranked.append([(tax.entries[i].id, float(s[i])) for i in order])
        for latent, d, label, top in zip(latents, descriptions, labels, ranked):
            best = top[0] if top and top[0][1] > 0 else (None, 0.0)
            rows.append({"latent": latent, "description": d, "label": label, "taxonomy": tax.name,
                         "category": best[0], "score": best[1], "top_k": json.dumps(top)})
    out = pd.DataFrame(rows, columns=list(MAPPING_COLUMNS))
    if out_dir is not None:
        save_mapping(out, out_dir)
    return out


def save_mapping(table: pd.DataFrame, out_dir: str | os.PathLike[str]) -> Path:
    """``categories.parquet`` + ``categories.csv`` in ``out_dir``."""
    return write_table(table, out_dir, CATEGORIES_STEM)


def load_mapping(out_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The mapping table written by ``map_descriptions`` (one row per latent and taxonomy)."""
    path = Path(out_dir) / CATEGORIES_PARQUET
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: run the map stage (`mneme map`) first.")
    return pd.read_parquet(path)


def category_links(mapping: pd.DataFrame, taxonomy: str | None = None) -> pd.DataFrame:
    """The mapping's ranked entries in long form: (latent, category, similarity), one row per entry
    of each latent's ``top_k`` (only ``taxonomy``'s rows when given)."""
    rows = []
    for row in mapping.itertuples(index=False):
        if taxonomy is not None and row.taxonomy != taxonomy:
            continue
        for category, similarity in json.loads(row.top_k):
            rows.append({"latent": int(row.latent), "category": category, "similarity": float(similarity)})
    return pd.DataFrame(rows, columns=list(LINK_COLUMNS))


def latent_descriptions(mapping: pd.DataFrame) -> dict[int, str]:
    """Latent id -> its description (first row per latent)."""
    first = mapping.drop_duplicates("latent")
    return {int(r.latent): str(r.description) for r in first.itertuples(index=False)}
