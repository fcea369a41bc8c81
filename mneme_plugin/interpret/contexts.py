"""Top-activating contexts per latent, collected in one streaming pass, in bounded memory.

For each chosen latent the collector keeps, over the whole corpus:

* the ``n_top`` contexts with the highest max activation (exact: a streaming top-N merge),
* a uniform sample of ``n_random`` activating contexts (priority sampling: every (latent,
  context) pair draws a random key, the smallest keys are kept; equivalent to reservoir sampling
  without replacement and vectorised), which Delphi's quantile sampler needs,
* a uniform sample of ``n_non_activating`` contexts where the latent is zero everywhere.

A context is one window of ``example_ctx_len`` tokens (Delphi's example window). A kept context
stores its tokens and the sparse activations of *all* chosen latents in it, so the Delphi cache
written from it gives every latent its true activations on every row. Contexts no latent refers
to any more are dropped after each batch: memory is O(latents x (n_top + n_random +
n_non_activating) x example_ctx_len), independent of the corpus length.

The activation value of latent j at a token is the crosscoder code f_j (``value="code"``, the
default), or f_j * w_j with w_j the crosscoder's salience weight (``value="weighted"``, the
quantity the published dashboards show). BOS, padding and special tokens never activate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.attribution.config import CLASSES
from mneme_plugin.errors import CheckpointError, ConfigError, EmptyCorpusError
from mneme_plugin.files import atomic_write, holds_output_lock, read_json
from mneme_plugin.interpret.config import CollectConfig, check_windows
from mneme_plugin.interpret.files import (
    BACKGROUND_FILE,
    CATEGORIES_STEM,
    CONTEXTS_FILE,
    EXPLANATIONS_STEM,
    TOKENIZER_DIR,
    remove_table,
)

logger = logging.getLogger("mneme_plugin")

CACHE_DIR = "latents"


@dataclass
class KeptContext:
    """One kept context: its tokens and the nonzero activations of the chosen latents in it."""

    tokens: torch.Tensor  # (ctx,) int64
    positions: torch.Tensor  # (nnz,) int64
    latent_index: torch.Tensor  # (nnz,) int64, index into the chosen latents
    values: torch.Tensor  # (nnz,) float32


class TopContextCollector:
    """Streaming top-N / random / non-activating contexts for ``latents`` (see module docstring)."""

    def __init__(self, latents: Sequence[int], ctx_len: int, n_top: int = 50, n_random: int = 50,
                 n_non_activating: int = 50, seed: int = 0, vocab_size: int | None = None) -> None:
        self.latents = [int(v) for v in latents]
        if not self.latents:
            raise ConfigError("No latents to collect contexts for.")
        L = len(self.latents)
        self.ctx_len, self.n_top, self.n_random, self.n_non = ctx_len, n_top, n_random, n_non_activating
        self.gen = torch.Generator().manual_seed(seed)
        self.top_vals = torch.full((L, n_top), -float("inf"))
        self.top_ids = torch.full((L, n_top), -1, dtype=torch.long)
        self.rand_keys = torch.full((L, n_random), float("inf"))
        self.rand_ids = torch.full((L, n_random), -1, dtype=torch.long)
        self.non_keys = torch.full((L, n_non_activating), float("inf"))
        self.non_ids = torch.full((L, n_non_activating), -1, dtype=torch.long)
        self.contexts: dict[int, KeptContext] = {}
        self.n_contexts = 0
        self.n_tokens = 0
        self.fire_tokens = torch.zeros(L, dtype=torch.long)
        self.fire_contexts = torch.zeros(L, dtype=torch.long)
        self.max_kept = 0
        self.background = torch.zeros(vocab_size or 0, dtype=torch.long)

    @staticmethod
    def _merge(vals: torch.Tensor, ids: torch.Tensor, new_vals: torch.Tensor, new_ids: torch.Tensor,
               largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
        k = vals.shape[1]
        if k == 0:
            return vals, ids
        all_vals = torch.cat([vals, new_vals], dim=1)
        all_ids = torch.cat([ids, new_ids.expand(vals.shape[0], -1)], dim=1)
        # Stable tie-break (earlier context first): sort by value, then take the first k.
        order = torch.sort(all_vals, dim=1, descending=largest, stable=True).indices[:, :k]
        return torch.gather(all_vals, 1, order), torch.gather(all_ids, 1, order)

    def update(self, tokens: torch.Tensor, acts: torch.Tensor, valid: torch.Tensor) -> None:
        """One batch of contexts: tokens (C, ctx) int, acts (C, ctx, L) >= 0, valid (C, ctx) bool."""
        C, T = tokens.shape
        if T != self.ctx_len or acts.shape != (C, T, len(self.latents)):
            raise ValueError(f"Expected tokens (C, {self.ctx_len}) and acts (C, {self.ctx_len}, {len(self.latents)}).")
        acts = acts.float() * valid[:, :, None]
        ids = torch.arange(self.n_contexts, self.n_contexts + C, dtype=torch.long)
        self.n_contexts += C
        self.n_tokens += int(valid.sum())
        if self.background.numel():
            self.background += torch.bincount(tokens[valid].long(), minlength=self.background.numel())[: self.background.numel()]
        ctx_max = acts.amax(dim=1)  # (C, L)
        active = ctx_max > 0
        has_valid = valid.any(dim=1)
        self.fire_tokens += (acts > 0).sum(dim=(0, 1))
        self.fire_contexts += active.sum(dim=0)
        new_top = torch.where(active, ctx_max, torch.tensor(-float("inf"))).T
        self.top_vals, self.top_ids = self._merge(self.top_vals, self.top_ids, new_top, ids[None], True)
        keys = torch.rand(C, len(self.latents), generator=self.gen)
        rand_new = torch.where(active, keys, torch.tensor(float("inf"))).T
        self.rand_keys, self.rand_ids = self._merge(self.rand_keys, self.rand_ids, rand_new, ids[None], False)
        keys = torch.rand(C, len(self.latents), generator=self.gen)
        non_new = torch.where(~active & has_valid[:, None], keys, torch.tensor(float("inf"))).T
        self.non_keys, self.non_ids = self._merge(self.non_keys, self.non_ids, non_new, ids[None], False)
        # Drop slots that hold no real context (keys inf / values -inf).
        self.top_ids[~torch.isfinite(self.top_vals)] = -1
        self.rand_ids[~torch.isfinite(self.rand_keys)] = -1
        self.non_ids[~torch.isfinite(self.non_keys)] = -1
        referenced = set(torch.cat([self.top_ids.reshape(-1), self.rand_ids.reshape(-1),
                                    self.non_ids.reshape(-1)]).unique().tolist()) - {-1}
        first = int(ids[0])
        for cid in sorted(c for c in referenced if c >= first):
            c = cid - first
            pos, lat = acts[c].nonzero(as_tuple=True)
            self.contexts[cid] = KeptContext(tokens[c].long().clone(), pos, lat, acts[c, pos, lat].clone())
        for cid in list(self.contexts):
            if cid not in referenced:
                del self.contexts[cid]
        self.max_kept = max(self.max_kept, len(self.contexts))

    def result(self, meta: dict[str, Any] | None = None) -> "LatentContexts":
        row_of = {cid: r for r, cid in enumerate(sorted(self.contexts))}
        per_latent = []
        for j, latent in enumerate(self.latents):
            top = [(row_of[int(c)], float(v)) for c, v in zip(self.top_ids[j], self.top_vals[j]) if int(c) >= 0]
            rand = sorted(row_of[int(c)] for c in self.rand_ids[j] if int(c) >= 0)
            non = sorted(row_of[int(c)] for c in self.non_ids[j] if int(c) >= 0)
            per_latent.append({
                "latent": latent, "top_rows": [r for r, _ in top], "top_values": [v for _, v in top],
                "random_rows": rand, "non_activating_rows": non,
                "fire_tokens": int(self.fire_tokens[j]), "fire_contexts": int(self.fire_contexts[j]),
            })
        rows = [self.contexts[c] for c in sorted(self.contexts)]
        tokens = torch.stack([c.tokens for c in rows]) if rows else torch.zeros(0, self.ctx_len, dtype=torch.long)
        locs, vals = [], []
        for r, c in enumerate(rows):
            locs.append(torch.stack([torch.full_like(c.positions, r), c.positions, c.latent_index], dim=1))
            vals.append(c.values)
        locations = torch.cat(locs) if locs else torch.zeros(0, 3, dtype=torch.long)
        values = torch.cat(vals) if vals else torch.zeros(0)
        return LatentContexts(
            latents=list(self.latents), tokens=tokens, locations=locations, values=values,
            per_latent=per_latent, n_tokens=self.n_tokens, n_contexts=self.n_contexts,
            background=self.background.numpy().copy(), meta=dict(meta or {}),
        )


@dataclass
class LatentContexts:
    """Collected contexts: ``tokens`` (rows, ctx), sparse ``locations`` (n, 3) = (row, position,
    index into ``latents``) with ``values`` (n,), and per-latent row lists (``per_latent``)."""

    latents: list[int]
    tokens: torch.Tensor
    locations: torch.Tensor
    values: torch.Tensor
    per_latent: list[dict[str, Any]]
    n_tokens: int
    n_contexts: int
    background: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    meta: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def ctx_len(self) -> int:
        return int(self.tokens.shape[1])

    def index_of(self, latent: int) -> int:
        try:
            return self.latents.index(int(latent))
        except ValueError:
            raise ConfigError(f"Latent {latent} was not collected; collected: {self.latents[:20]}...") from None

    def dense(self, latent: int, rows: Sequence[int]) -> torch.Tensor:
        """Activations (len(rows), ctx) of ``latent`` on the given rows."""
        j = self.index_of(latent)
        rows_t = torch.as_tensor(list(rows), dtype=torch.long)
        out = torch.zeros(len(rows_t), self.ctx_len)
        sel = self.locations[:, 2] == j
        loc, val = self.locations[sel], self.values[sel]
        where = {int(r): i for i, r in enumerate(rows_t)}
        for (r, p, _), v in zip(loc.tolist(), val.tolist()):
            if r in where:
                out[where[r], p] = v
        return out

    def top_examples(self, latent: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """(tokens (n, ctx), activations (n, ctx), max values) of the latent's top contexts."""
        info = self.per_latent[self.index_of(latent)]
        rows = info["top_rows"]
        return self.tokens[rows], self.dense(latent, rows), list(info["top_values"])

    # ----------------------------------------------------------------------------- I/O

    def save(self, out_dir: str | os.PathLike[str], hookpoint: str, model_name: str = "",
             n_splits: int = 1, width: int | None = None, tokenizer: Any = None) -> Path:
        """Write the Delphi cache (``latents/<hookpoint>/<start>_<end>.safetensors`` + config.json),
        ``contexts.json``, the background token counts and (if given) the tokenizer."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # contexts.json, written last, says the folder is whole: an earlier one goes first, so a save
        # stopped part-way leaves no old index over the new cache.
        (out_dir / CONTEXTS_FILE).unlink(missing_ok=True)
        _remove_derived_tables(out_dir)
        width = int(width if width is not None else max(self.latents) + 1)
        write_delphi_cache(self, out_dir / CACHE_DIR, hookpoint, width, n_splits=n_splits, model_name=model_name)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out_dir / TOKENIZER_DIR))
        atomic_write(out_dir / BACKGROUND_FILE, lambda p: np.save(p, self.background, allow_pickle=False))
        summary = {
            "format": "mneme-contexts", "version": 1, "hookpoint": hookpoint, "width": width,
            "ctx_len": self.ctx_len, "n_tokens": self.n_tokens, "n_contexts": self.n_contexts,
            "latents": self.latents, "per_latent": self.per_latent, "meta": self.meta,
        }
        atomic_write(out_dir / CONTEXTS_FILE, lambda p: p.write_text(json.dumps(summary, indent=1)))
        self.out_dir = out_dir
        return out_dir


def _remove_derived_tables(out_dir: Path) -> None:
    """Explanations and a mapping of earlier contexts in this folder (`mneme explain` writes beside the contexts
    by default) describe latents these contexts may not hold: they go, so `mneme info`, `map` and `predict`
    do not read them as these contexts'."""
    removed = [stem for stem in (EXPLANATIONS_STEM, CATEGORIES_STEM) if remove_table(out_dir, stem)]
    if removed:
        logger.info("Removed the %s of the earlier contexts in %s (they describe those contexts' latents).",
                    " and ".join(removed), out_dir)


def delphi_cache_config(ctx_len: int, n_tokens: int, n_splits: int, model_name: str, **extra: Any) -> dict[str, Any]:
    """Delphi's ``CacheConfig`` fields (0.1.3) + ``model_name``, as its ``LatentCache.save_config`` writes."""
    return {
        "dataset_repo": extra.pop("dataset_repo", "mneme"),
        "dataset_split": extra.pop("dataset_split", "train"),
        "dataset_name": "",
        "dataset_column": "text",
        "batch_size": 1,
        "cache_ctx_len": ctx_len,
        "n_tokens": n_tokens,
        "n_splits": n_splits,
        "model_name": model_name,
        **extra,
    }


def check_splits(n_splits: int, width: int) -> None:
    """Each split of the Delphi cache must hold at least one latent: with more splits than latents, Delphi's
    split bounds (``linspace(0, width, n_splits + 1)``) repeat and give files of empty ranges (``0_-1``),
    which Delphi's ``LatentDataset`` reads as bounds of other files, asking for files that do not exist."""
    if n_splits > width:
        raise ConfigError(f"collect.n_splits ({n_splits}) is more than the crosscoder's {width} latents: each split "
                          f"of the Delphi cache holds a range of latents; give n_splits <= {width}.")


def write_delphi_cache(contexts: LatentContexts, cache_dir: str | os.PathLike[str], hookpoint: str, width: int,
                       n_splits: int = 1, model_name: str = "") -> Path:
    """Delphi's cache layout: ``<cache_dir>/<hookpoint>/<start>_<end>.safetensors`` (inclusive
    latent bounds, splits of [0, width) as ``LatentCache.save_splits`` makes them) holding
    ``locations`` (n, 3) = (row, position, latent - start), ``activations`` (n,) float16 and
    ``tokens`` (rows, ctx); plus ``config.json``. Read it with ``delphi.latents.LatentDataset``
    (pass the tokenizer; ``example_ctx_len`` = our ``ctx_len``)."""
    from safetensors.numpy import save_file

    check_splits(n_splits, width)
    module_dir = Path(cache_dir) / hookpoint
    module_dir.mkdir(parents=True, exist_ok=True)
    for old in module_dir.glob("*.safetensors"):
        old.unlink()
    boundaries = torch.linspace(0, width, steps=n_splits + 1).long()
    latent_ids = torch.as_tensor(contexts.latents, dtype=torch.long)
    global_latent = latent_ids[contexts.locations[:, 2]] if len(contexts.locations) else torch.zeros(0, dtype=torch.long)
    tokens = contexts.tokens.numpy().astype(np.int64)
    for start, stop in zip(boundaries[:-1].tolist(), boundaries[1:].tolist()):
        end = stop - 1
        mask = (global_latent >= start) & (global_latent <= end)
        loc = contexts.locations[mask].clone()
        if len(loc):
            loc[:, 2] = global_latent[mask] - start
        dtype = np.uint16 if (len(loc) == 0 or (int(loc[:, 2].max()) < 2**16 and int(loc[:, 0].max()) < 2**16)) else np.uint32
        data = {
            "locations": loc.numpy().astype(dtype).reshape(-1, 3),
            "activations": contexts.values[mask].numpy().astype(np.float16),
            "tokens": tokens,
        }
        final = module_dir / f"{start}_{end}.safetensors"
        atomic_write(final, lambda p: save_file(data, str(p)))
    cfg = delphi_cache_config(contexts.ctx_len, contexts.n_tokens, n_splits, model_name)
    atomic_write(module_dir / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=4)))
    return module_dir


def load_contexts(path: str | os.PathLike[str]) -> LatentContexts:
    """Read a ``collect`` output directory back."""
    from safetensors.numpy import load_file

    path = Path(path)
    summary_file = path / CONTEXTS_FILE
    if not summary_file.is_file():
        raise CheckpointError(f"{path} holds no collected contexts: {summary_file} does not exist (run `mneme collect`).")
    summary = read_json(summary_file, "collect again (`mneme collect`)")
    module_dir = path / CACHE_DIR / summary["hookpoint"]
    files = sorted(module_dir.glob("*.safetensors"), key=lambda f: int(f.stem.split("_")[0]))
    if not files:
        raise CheckpointError(f"{module_dir} holds no Delphi cache files.")
    index = {lat: j for j, lat in enumerate(summary["latents"])}
    tokens = None
    locs, vals = [], []
    for f in files:
        data = load_file(str(f))
        start = int(f.stem.split("_")[0])
        tokens = torch.from_numpy(data["tokens"].astype(np.int64)) if tokens is None else tokens
        loc = torch.from_numpy(data["locations"].astype(np.int64)).reshape(-1, 3)
        if len(loc):
            loc[:, 2] = torch.tensor([index[int(v) + start] for v in loc[:, 2].tolist()], dtype=torch.long)
        locs.append(loc)
        vals.append(torch.from_numpy(data["activations"].astype(np.float32)))
    background = np.load(path / BACKGROUND_FILE) if (path / BACKGROUND_FILE).is_file() else np.zeros(0, np.int64)
    return LatentContexts(
        latents=list(summary["latents"]), tokens=tokens, locations=torch.cat(locs), values=torch.cat(vals),
        per_latent=summary["per_latent"], n_tokens=summary["n_tokens"], n_contexts=summary["n_contexts"],
        background=background, meta=dict(summary.get("meta", {}), hookpoint=summary["hookpoint"],
                                          width=summary["width"]),
        out_dir=path,
    )


# --------------------------------------------------------------------------------- selection


def as_attribution(attribution: Any) -> Any:
    """An ``AttributionResult`` as is; an attribution directory loaded."""
    if isinstance(attribution, (str, os.PathLike)):
        from mneme_plugin.attribution import load_attribution

        return load_attribution(attribution)
    return attribution


def select_latents(attribution: Any = None, config: Any = None, width: int | None = None) -> list[int]:
    """Latent ids to collect: ``config.latents``, else by class and rank from the attribution
    (a directory or ``AttributionResult``), else all ``width`` latents."""
    if config is not None and config.latents is not None:
        return sorted({int(v) for v in config.latents})
    if attribution is None:
        if config is not None and config.classes:
            raise ConfigError(f"collect.classes {list(config.classes)} choose latents by their attribution class: pass "
                              "the attribution (collect(..., attribution=DIR), --attribution), or leave classes out "
                              "to collect every latent.")
        if width is None:
            raise ConfigError("No latents chosen: pass latents, an attribution table, or collect all (width).")
        return list(range(width))
    table = as_attribution(attribution).table
    classes = list(config.classes) if config is not None and config.classes else None
    per_class = config.per_class if config is not None else None
    alive = table[table["latent_class"] != "dead"]
    if classes is None:
        chosen = alive if per_class is None else alive.reindex(alive["score"].abs().sort_values(ascending=False).index).head(per_class)
        return sorted(int(v) for v in chosen["latent"])
    known = set(table["latent_class"].unique()) | (set(CLASSES) - {"dead"})
    unknown = sorted(set(classes) - known)
    if unknown:
        raise ConfigError(f"Unknown attribution class(es) {unknown}; known: {sorted(known)}.")
    out: list[int] = []
    from mneme_plugin.attribution.classify import most_specific_first

    for name in classes:
        rows = most_specific_first(alive, name)
        out.extend(int(v) for v in (rows if per_class is None else rows.head(per_class))["latent"])
    return sorted(set(out))


def reference_sample(attribution: Any, n: int, seed: int = 0) -> list[int]:
    """A uniform random sample of ``n`` live latents of any class (all of them when fewer are live):
    the reference against which a category's share among changed latents is judged."""
    if n <= 0 or attribution is None:
        return []
    table = as_attribution(attribution).table
    alive = table.loc[table["latent_class"] != "dead", "latent"].to_numpy()
    if n >= len(alive):
        return sorted(int(v) for v in alive)
    rng = np.random.default_rng(seed)
    return sorted(int(v) for v in rng.choice(alive, size=n, replace=False))


def load_reference_latents(contexts_dir: str | os.PathLike[str]) -> list[int]:
    """The uniform reference sample ``collect`` drew (``CollectConfig.reference_latents``); empty when
    it drew none. Reads only ``contexts.json``."""
    summary_file = Path(contexts_dir) / CONTEXTS_FILE
    if not summary_file.is_file():
        raise CheckpointError(f"{summary_file} does not exist: run the collect stage (`mneme collect`) first.")
    meta = read_json(summary_file, "collect again (`mneme collect`)").get("meta", {})
    return [int(v) for v in meta.get("reference_latents", [])]


# --------------------------------------------------------------------------------- collect


def _load_crosscoder(crosscoder: Any) -> Any:
    """A crosscoder object as is; a path (any format ``load_crosscoder`` reads, or a run directory) loaded.

    Every architecture works here: collect needs only ``encode``; a DECOUPLED crosscoder's value is its
    union code (latent j's pre-activation where either model keeps it).
    """
    if isinstance(crosscoder, (str, os.PathLike)):
        from mneme_plugin.formats import load_crosscoder

        return load_crosscoder(crosscoder)
    return crosscoder


@torch.no_grad()
def latent_values(crosscoder: Any, x: torch.Tensor, latents: torch.Tensor, value: str = "code",
                  encode_batch: int = 4096) -> torch.Tensor:
    """Activation values (n, L) of the chosen latents for paired activations x (n, 2, d)."""
    out = []
    weights = None
    if value == "weighted":
        w = crosscoder.salience_weights()
        weights = (w if w.ndim == 1 else w.sum(0))[latents].float()
    for start in range(0, x.shape[0], encode_batch):
        chunk = x[start : start + encode_batch].to(crosscoder.W_enc.device, crosscoder.W_enc.dtype)
        f = crosscoder.encode(chunk)[:, latents.to(crosscoder.W_enc.device)].float().cpu()
        out.append(f if weights is None else f * weights.cpu())
    return torch.cat(out) if out else torch.zeros(0, len(latents))


def reading_config(config: CollectConfig, crosscoder: Any) -> HarvestConfig:
    """How ``collect`` reads the corpus: ``config.harvest``, checked against the layer and hook the
    crosscoder records, or (None) a harvest config at the recorded layer and hook."""
    from mneme_plugin.crosscoder.provenance import HOOK_KEYS, check_same_source, recorded_reading

    if config.harvest is None:
        # The recorded layer, hook and windows (the harvest default window is for real models).
        reading = HarvestConfig(**recorded_reading(crosscoder))
    else:
        reading = config.harvest
        actual = {"layer": reading.layer, "hook_name": reading.resolved_hook_name}
        check_same_source(crosscoder, actual, what="the collect's hook", override="--allow-hook-mismatch "
                          "(collect.allow_hook_mismatch: true)", keys=HOOK_KEYS, allow=config.allow_hook_mismatch)
    check_windows(reading.context_length, config.example_ctx_len)
    return reading


@holds_output_lock("out_dir", "contexts folder (--out)")
def collect(
    base: Any,
    edited: Any,
    crosscoder: Any,
    corpus: Any,
    config: CollectConfig,
    out_dir: str | os.PathLike[str] | None = None,
    attribution: Any = None,
    progress: bool = True,
) -> LatentContexts:
    """Stream ``corpus`` through both models and the crosscoder; keep the contexts of each chosen
    latent (see module docstring). Writes the Delphi cache and ``contexts.json`` to ``out_dir``.

    The corpus is read in the harvest's windows (``HarvestContext.windows``) at the hook of
    ``reading_config(config, crosscoder)``."""
    from tqdm.auto import tqdm

    from mneme_plugin.activations.corpus import describe_corpus
    from mneme_plugin.activations.harvest import HarvestContext
    from mneme_plugin.activations.models import forward_to_hook, model_name
    from mneme_plugin.crosscoder.provenance import check_model_pair

    config = CollectConfig.of(config)
    cc = _load_crosscoder(crosscoder)
    cc.eval()
    check_model_pair(cc, base, edited, what="the collect")  # before loading them
    check_splits(config.n_splits, int(cc.dict_size))
    hcfg = reading_config(config, cc)
    if attribution is not None:  # read once (the selection and the reference sample use it), before the models load
        attribution = as_attribution(attribution)
    ctx = HarvestContext.build(base, edited, hcfg)
    if int(cc.cfg.activation_dim) != ctx.d_model:
        raise ConfigError(f"The crosscoder expects d={cc.cfg.activation_dim} but the models have d_model={ctx.d_model}.")
    reference = reference_sample(attribution, config.reference_latents, config.seed)
    if config.reference_latents and attribution is None:
        logger.warning("collect.reference_latents needs the attribution table: no reference sample drawn.")
    latents = sorted(set(select_latents(attribution, config, width=int(cc.dict_size))) | set(reference))
    bad = [v for v in latents if not 0 <= v < cc.dict_size]
    if bad:
        raise ConfigError(f"Latent ids {bad[:10]} are out of range for a crosscoder with {cc.dict_size} latents.")
    latent_t = torch.tensor(latents, dtype=torch.long)
    tok = ctx.tokenizer
    collector = TopContextCollector(latents, config.example_ctx_len, config.n_top, config.n_random,
                                    config.n_non_activating, config.seed, vocab_size=len(tok))
    dropped = ctx.dropped_ids()
    E = config.example_ctx_len
    n_windows = hcfg.window_budget
    n_batches = None if n_windows is None else -(-n_windows // hcfg.batch_size)
    for batch in tqdm(ctx.windows(corpus), total=n_batches, desc="collect", unit="batch", disable=not progress):
        tokens = torch.stack([w.tokens for w in batch])
        mask = torch.stack([w.mask for w in batch])
        valid = mask & ~torch.isin(tokens, dropped)
        acts_b = forward_to_hook(ctx.base, tokens, ctx.hook_name).to("cpu")
        acts_e = forward_to_hook(ctx.edited, tokens, ctx.hook_name).to("cpu")
        B, T, d = acts_b.shape
        x = torch.stack([acts_b, acts_e], dim=2).reshape(B * T, 2, d)
        values = torch.zeros(B * T, len(latents))
        flat_valid = valid.reshape(-1)
        if flat_valid.any():
            values[flat_valid] = latent_values(cc, x[flat_valid], latent_t, config.value, config.encode_batch)
        collector.update(tokens.reshape(-1, E), values.reshape(-1, E, len(latents)), valid.reshape(-1, E))
    if collector.n_tokens == 0:
        raise EmptyCorpusError(f"The corpus {describe_corpus(corpus)} gave no usable tokens.")
    result = collector.result(meta={
        "base_model": model_name(ctx.base), "edited_model": model_name(ctx.edited), "corpus": describe_corpus(corpus),
        "value": config.value, "config": config.replace(harvest=hcfg).to_dict(), "max_contexts_held": collector.max_kept,
        "reference_latents": reference,
    })
    if out_dir is not None:
        result.save(out_dir, ctx.hook_name, model_name=model_name(ctx.base), n_splits=config.n_splits,
                    width=int(cc.dict_size), tokenizer=tok)
    logger.info("Collected contexts for %d latents over %d tokens (%d contexts held at most).",
                len(latents), collector.n_tokens, collector.max_kept)
    return result


def iter_records_delphi(contexts_dir: str | os.PathLike[str], tokenizer: Any, constructor: dict[str, Any] | None = None,
                        sampler: dict[str, Any] | None = None, latents: Iterable[int] | None = None) -> Any:
    """Delphi ``LatentDataset`` over a ``collect`` directory (Delphi must be installed). Delphi decodes
    the examples' tokens through :class:`~mneme_plugin.interpret.delphi_compat.PerTokenTokenizer`
    (one string per token under transformers 4 and 5 alike)."""
    from mneme_plugin.interpret.delphi_compat import PerTokenTokenizer, import_delphi

    import_delphi("delphi.clients")
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents import LatentDataset

    contexts_dir = Path(contexts_dir)
    summary = read_json(contexts_dir / CONTEXTS_FILE, "collect again (`mneme collect`)")
    hook = summary["hookpoint"]
    ccfg = ConstructorConfig(**{"example_ctx_len": summary["ctx_len"], "min_examples": 1,
                                "n_non_activating": 20, "center_examples": True,
                                "non_activating_source": "random", **(constructor or {})})
    scfg = SamplerConfig(**{"n_examples_train": 20, "n_examples_test": 20, "n_quantiles": 5,
                            "train_type": "top", **(sampler or {})})
    chosen = None if latents is None else {hook: torch.tensor(sorted(int(v) for v in latents), dtype=torch.long)}
    return LatentDataset(str(contexts_dir / CACHE_DIR), scfg, ccfg, tokenizer=PerTokenTokenizer(tokenizer),
                         modules=[hook], latents=chosen)
