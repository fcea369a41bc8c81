"""Harvesting paired activations: both models on the same token batches, one row per token.

Two passes over the start of the corpus: a statistics pass over the first
``normalization_tokens`` kept tokens (median norms for the outlier filter, mean norms for the
scale factors), then the harvest proper. Estimating first keeps memory bounded (only norms are
held) and means every stored row was filtered with the same thresholds; it costs one extra
forward over ``normalization_tokens`` tokens, negligible next to a real harvest.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.activations.corpus import (
    CorpusSource,
    batch_windows,
    corpus_fingerprint,
    describe_corpus,
    is_one_shot,
    iter_windows,
    require_reiterable,
)
from mneme_plugin.activations.models import (
    forward_to_hook,
    load_model,
    model_name,
    model_tokenizer,
    same_model,
    same_source,
    validate_pair,
    weights_digest,
)
from mneme_plugin.activations.normalization import (
    NormalizationStats,
    estimate_stats,
    outlier_keep_mask,
    token_norms,
)
from mneme_plugin.activations.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, read_manifest, write_manifest
from mneme_plugin.activations.store import ActivationStore, write_shard
from mneme_plugin.activations.sharded import COUNT_KEYS, harvest_sharded
from mneme_plugin.distributed import distributed_context, main_rank_lock
from mneme_plugin.errors import ConfigError, EmptyCorpusError, ForeignOutputError, NonFiniteActivationError
from mneme_plugin.files import (
    LOCK_FILE, output_lock, remove_stale_temporaries, require_free_space, temporary_target, tree_size,
)

logger = logging.getLogger("mneme_plugin")
# Below this many tokens a median norm moves by several percent between corpora: worth a warning.
FEW_NORMALIZATION_TOKENS = 1_000

TWO_PASSES = ("a harvest reads it twice (the normalisation estimate over its start, then the harvest from its "
              "beginning)")

_STORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class BatchRows:
    """Kept rows of one forward batch (before outlier filtering)."""

    activations: torch.Tensor  # (n, 2, d), model dtype
    tokens: torch.Tensor  # (n,) int64
    positions: torch.Tensor  # (n,) int64
    windows: torch.Tensor  # (n,) int64
    windows_end: int  # index one past the last window of this batch
    special_dropped: int
    padding_dropped: int
    n_corpus_tokens: int


def weights_fingerprint(spec: Any, model: Any) -> str | None:
    """What identifies the weights of a model given as ``spec`` (loaded as ``model``), for a store's manifest:
    ``models.weights_digest`` of a name or folder (a local folder's file names, sizes and times, its gigabytes
    never read; a hub model's commit in the local cache), also of a model object loaded from one. None for a
    model object built in memory, or a hub model not in the cache."""
    name = spec if isinstance(spec, str) else getattr(model, "_mneme_source_name", None)
    return weights_digest(name) if isinstance(name, str) else None


@dataclass
class HarvestContext:
    """A validated model pair with everything the batch loop needs."""

    base: Any
    edited: Any
    config: HarvestConfig
    hook_name: str
    tokenizer: Any
    d_model: int
    # (base, edited) fingerprints of the weights of models given by name or folder (None: not known).
    weights: tuple[str | None, str | None] = (None, None)

    @classmethod
    def build(cls, base: Any, edited: Any, config: HarvestConfig) -> "HarvestContext":
        if same_model(base, edited):
            logger.warning("The base and the edited model are the same (%s): a crosscoder finds no difference "
                           "between a model and itself. Give the edited (fine-tuned / unlearned) model as the edited one.",
                           base if isinstance(base, str) else model_name(base))
        specs = (base, edited)
        base = load_model(base, config.device, config.model_dtype, role="base")
        edited = load_model(edited, config.device, config.model_dtype, role="edited")
        hook_name = config.resolved_hook_name
        validate_pair(base, edited, config.layer, hook_name, config.context_length)
        # After loading: a hub model downloaded just now has its commit in the cache.
        weights = (weights_fingerprint(specs[0], base), weights_fingerprint(specs[1], edited))
        return cls(base, edited, config, hook_name, model_tokenizer(base), int(base.cfg.d_model), weights)

    def windows(self, corpus: CorpusSource, start_window: int = 0) -> Iterator[list]:
        cfg = self.config
        windows = iter_windows(
            corpus, self.tokenizer, cfg.context_length, cfg.max_tokens, cfg.text_field,
            cfg.messages_field, cfg.append_eos,
        )
        if start_window:
            windows = itertools.islice(windows, start_window, None)
        return batch_windows(windows, cfg.batch_size)

    def dropped_ids(self) -> torch.Tensor:
        cfg, tok = self.config, self.tokenizer
        ids: set[int] = set()
        if cfg.drop_special_tokens:
            ids |= {int(i) for i in getattr(tok, "all_special_ids", []) if i is not None}
        bos = getattr(tok, "bos_token_id", None)
        if bos is not None:
            # BOS is one of the special tokens too: drop_bos decides for it either way (a tokenizer whose
            # BOS is also its EOS keeps both, which the ids cannot tell apart).
            if cfg.drop_bos:
                ids.add(int(bos))
            else:
                ids.discard(int(bos))
        return torch.tensor(sorted(ids), dtype=torch.long)

    def run_batch(self, windows: list, batch_index: int, dropped_ids: torch.Tensor) -> BatchRows:
        """Forward both models on one batch of windows and keep the wanted positions."""
        tokens = torch.stack([w.tokens for w in windows])
        mask = torch.stack([w.mask for w in windows])
        index = torch.tensor([w.index for w in windows], dtype=torch.long)
        acts_b = forward_to_hook(self.base, tokens, self.hook_name).to("cpu")
        acts_e = forward_to_hook(self.edited, tokens, self.hook_name).to("cpu")
        bad_b = int((~torch.isfinite(acts_b[mask])).sum())
        bad_e = int((~torch.isfinite(acts_e[mask])).sum())
        if bad_b or bad_e:
            raise NonFiniteActivationError(
                f"{bad_b + bad_e} non-finite activation values (base {model_name(self.base)}: {bad_b}, "
                f"edited {model_name(self.edited)}: {bad_e}) at {self.hook_name} in batch {batch_index} "
                f"(windows {index[0].item()}..{index[-1].item()}). Check the model weights, or load the "
                "models in float32 if they overflow in half precision."
            )
        keep = mask.clone() if self.config.drop_padding else torch.ones_like(mask)
        special = torch.isin(tokens, dropped_ids) & mask
        special_dropped = int((special & keep).sum())
        keep &= ~special
        padding_dropped = int((~mask).sum()) if self.config.drop_padding else 0
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return BatchRows(
            activations=torch.stack([acts_b[keep], acts_e[keep]], dim=1),
            tokens=tokens[keep],
            positions=positions[keep],
            windows=index[:, None].expand_as(tokens)[keep],
            windows_end=int(index[-1]) + 1,
            special_dropped=special_dropped,
            padding_dropped=padding_dropped,
            n_corpus_tokens=int(mask.sum()),
        )

    def estimate_normalization(self, corpus: CorpusSource) -> NormalizationStats:
        """Median / mean norms over the first ``normalization_tokens`` kept tokens (a pass over the start of
        ``corpus``, which is then read again: a one-shot iterator is refused)."""
        require_reiterable(corpus, TWO_PASSES)
        wanted = self.config.normalization_tokens
        dropped = self.dropped_ids()
        norms, total = [], 0
        for i, windows in enumerate(self.windows(corpus)):
            rows = self.run_batch(windows, i, dropped)
            norms.append(token_norms(rows.activations))
            total += rows.activations.shape[0]
            if total >= wanted:
                break
        if total == 0:
            raise EmptyCorpusError(
                f"The corpus {describe_corpus(corpus)} has no usable tokens: every position was "
                "padding, BOS or a special token."
            )
        all_norms = torch.cat(norms)[:wanted]
        if total < min(wanted, FEW_NORMALIZATION_TOKENS):
            logger.warning(
                "Normalisation estimated on %d tokens only (normalization_tokens=%d): the corpus is too short for a "
                "stable norm estimate; give a longer corpus.", total, wanted,
            )
        elif total < wanted:
            # Every token the corpus has, and enough of them: a note, not a warning (the organism's
            # ~45k-token slice printed a warning on every case of the default demo).
            logger.info("Normalisation estimated on all %d tokens of the corpus (normalization_tokens=%d).",
                        total, wanted)
        return estimate_stats(all_norms, self.d_model, self.config.outlier_factor)


def shard_tensors(batches: list[BatchRows], store_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one store shard, from the batches buffered for it."""
    return {
        "activations": torch.cat([r.activations for r in batches]).to(store_dtype),
        "tokens": torch.cat([r.tokens for r in batches]).to(torch.int32),
        "positions": torch.cat([r.positions for r in batches]).to(torch.int32),
        "windows": torch.cat([r.windows for r in batches]).to(torch.int64),
    }


def filter_outliers(rows: BatchRows, stats: NormalizationStats, factor: float | None) -> tuple[BatchRows, int]:
    """Drop rows whose norm exceeds factor x median in either model; return (rows, n_dropped)."""
    keep = outlier_keep_mask(token_norms(rows.activations), torch.tensor(stats.median_norms), factor)
    n_dropped = int((~keep).sum())
    if n_dropped == 0:
        return rows, 0
    rows.activations = rows.activations[keep]
    rows.tokens = rows.tokens[keep]
    rows.positions = rows.positions[keep]
    rows.windows = rows.windows[keep]
    return rows, n_dropped


def add_filtered_batch(rows: BatchRows, stats: NormalizationStats, factor: float | None,
                       counts: dict[str, int]) -> BatchRows:
    """``filter_outliers`` on one batch's rows, its drops and corpus tokens added to the store's
    ``counts`` (``sharded.COUNT_KEYS``): what every harvest loop does with a batch before keeping it."""
    rows, n_out = filter_outliers(rows, stats, factor)
    counts["outliers_dropped"] += n_out
    counts["special_tokens_dropped"] += rows.special_dropped
    counts["padding_dropped"] += rows.padding_dropped
    counts["n_corpus_tokens"] += rows.n_corpus_tokens
    return rows


def _new_manifest(ctx: HarvestContext, corpus: CorpusSource, stats: NormalizationStats) -> dict[str, Any]:
    cfg = ctx.config
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "base_model": model_name(ctx.base),
        "edited_model": model_name(ctx.edited),
        "model_weights": {"base": ctx.weights[0], "edited": ctx.weights[1]},
        "layer": cfg.layer,
        "hook_name": ctx.hook_name,
        "d_model": ctx.d_model,
        "dtype": cfg.dtype,
        "context_length": cfg.context_length,
        "corpus": describe_corpus(corpus),
        "corpus_fingerprint": corpus_fingerprint(corpus),
        "config": cfg.content_dict(),
        "n_tokens": 0,
        "n_windows": 0,
        "n_corpus_tokens": 0,
        "shards": [],
        "normalization": stats.to_dict(),
        "outliers_dropped": 0,
        "special_tokens_dropped": 0,
        "padding_dropped": 0,
        "complete": False,
    }


def _check_resumable(manifest: dict[str, Any], ctx: HarvestContext, path: Path) -> None:
    old, new = manifest.get("config", {}), ctx.config.content_dict()
    diffs = [f"{k}: stored {old.get(k)!r} vs now {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    for key, now in (("base_model", model_name(ctx.base)), ("edited_model", model_name(ctx.edited))):
        if not same_source(manifest.get(key), now):
            diffs.append(f"{key}: stored {manifest.get(key)!r} vs now {now!r}")
    if manifest.get("d_model") != ctx.d_model:
        diffs.append(f"d_model: stored {manifest.get('d_model')!r} vs now {ctx.d_model!r}")
    state = "complete" if manifest.get("complete") else "partial"
    if diffs:
        raise ForeignOutputError(
            f"{path} already holds a {state} activation store harvested with a different setup ("
            + "; ".join(diffs)
            + "). Use another out_dir, pass overwrite=True, or restore the original config to resume.",
            path,
        )
    # The same folders may hold other weights now (a fine-tune saved again): rows of two models in one store.
    # A store written before the fingerprints were recorded has none, and is not checked.
    stored = manifest.get("model_weights")
    stored = stored if isinstance(stored, dict) else {}
    changed = [f"{role} model {manifest.get(f'{role}_model')} (weights fingerprint {stored[role]} then, {now} now)"
               for role, now in zip(("base", "edited"), ctx.weights)
               if stored.get(role) is not None and now is not None and stored[role] != now]
    if changed:
        raise ForeignOutputError(
            f"{path} holds a {state} activation store harvested from other weights of the same models: the files of "
            + " and of the ".join(changed)
            + " changed since. A store holds one pair of models' activations: pass overwrite=True (--overwrite) to "
            "start over with the models as they are now, use another out_dir, or give the models the store was "
            + ("harvested from to resume it." if state == "partial" else "harvested from."),
            path,
        )


def check_same_corpus(manifest: dict[str, Any], corpus: CorpusSource, path: Path) -> None:
    """A store is tied to its corpus: refuse to reuse or resume it with another one."""
    stored, now = manifest.get("corpus_fingerprint"), corpus_fingerprint(corpus)
    stored_name, now_name = manifest.get("corpus"), describe_corpus(corpus)
    if stored is not None and now is not None:
        same = stored == now
    elif now is None:  # an in-memory iterable: its content cannot be known without consuming it
        logger.warning("Cannot check that the corpus %s is the one %s was harvested from (%s).", now_name, path,
                       stored_name)
        same = True
    else:  # a store of an older version, which recorded the corpus's name only
        same = stored_name == now_name or str(stored_name).startswith("<")
    if not same:
        state = "complete" if manifest.get("complete") else "partial"
        raise ForeignOutputError(
            f"{path} holds a {state} activation store harvested from corpus {stored_name} (fingerprint {stored}), "
            f"but the corpus is now {now_name} (fingerprint {now}). A store belongs to one corpus: use another "
            "out_dir, pass overwrite=True (--overwrite) to start over, or give the original corpus"
            + (" to resume." if state == "partial" else "."),
            path,
        )


def require_room_for_store(path: Path, config: HarvestConfig, d_model: int) -> None:
    """Refuse to start (or resume) a harvest whose store does not fit the free space of its disk: the token
    budget's rows (both models, ``config.dtype``) less the shards written already (nothing is checked
    without a budget: the whole corpus's size is unknown)."""
    if config.token_budget is None:
        return
    row = 2 * d_model * _STORE_DTYPES[config.dtype].itemsize
    require_free_space(path, config.token_budget * row - tree_size(path, "*.safetensors"),
                       f"The activation store ({config.token_budget:,} tokens x 2 models x d_model {d_model}, {config.dtype})",
                       "free space there, choose an out_dir on a larger disk, lower max_tokens, or train while "
                       "harvesting (training.stream: true in `mneme run`, `mneme train --stream`: no store on disk)")


# The files a store writes: its manifest, one process's shards, the ranks' shards and progress files
# (activations/sharded.py), and the temporaries of their atomic writes (files.temporary_sibling).
_STORE_FILE = re.compile(r"manifest\.json|manifest\.rank\d+\.json|shard_\d+\.safetensors"
                         r"|(?:g\d+_)?rank\d+_shard_\d+\.safetensors")


def is_store_file(entry: Path) -> bool:
    """Whether ``entry`` is a file a store writes (or the temporary of one); a folder never is."""
    if entry.is_dir() and not entry.is_symlink():
        return False
    return _STORE_FILE.fullmatch(temporary_target(entry.name) or entry.name) is not None


def _foreign_manifest(path: Path) -> bool:
    """Whether ``path`` holds a manifest.json of something else (JSON, but no activation store's). One that is
    no JSON at all is taken for a store's, damaged: only a store writes that name next to its shards."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return not (isinstance(data, dict) and data.get("format") == FORMAT_NAME)


def foreign_folder_error(path: Path, overwrite: bool = False) -> ForeignOutputError:
    """The refusal of a folder that holds things but no activation store's manifest. overwrite=True is named as
    the remedy only where the folder holds a store's files (a damaged store): it deletes those and no others."""
    entries = store_folder_entries(path)
    foreign_manifest = _foreign_manifest(path)
    if not foreign_manifest and any(is_store_file(p) for p in entries):
        return ForeignOutputError(
            f"{path} holds activation store files but no readable {MANIFEST}: a damaged store. Choose an empty or "
            "new out_dir, or pass overwrite=True (--overwrite) to delete the store's files and harvest again.",
            path,
        )
    held = ", ".join(sorted(p.name for p in entries)[:5]) + (", ..." if len(entries) > 5 else "")
    why = f"its {MANIFEST} is not an activation store's" if foreign_manifest else f"no {MANIFEST}, no shards"
    return ForeignOutputError(
        f"{path} is not empty ({held}) and is no activation store ({why}): refusing to harvest into a foreign folder"
        + (", even with overwrite, which deletes only a store's files" if overwrite else "")
        + ". Choose an empty or new out_dir.",
        path,
    )


def store_folder_entries(path: Path) -> list[Path]:
    """What ``path`` holds besides the lock file (a folder with nothing else counts as empty)."""
    return [p for p in path.iterdir() if p.name != LOCK_FILE]


def clear_store_folder(path: Path) -> None:
    """For ``overwrite``: delete the store ``path`` holds (its manifest, shards, progress files and
    temporaries), and nothing else: other files stay. A folder holding other things but no store (or a
    manifest.json of something else) is refused before anything is deleted (ForeignOutputError)."""
    if not path.is_dir():
        return
    entries = store_folder_entries(path)
    store_files = [p for p in entries if is_store_file(p)]
    if entries and (not store_files or _foreign_manifest(path)):
        raise foreign_folder_error(path, overwrite=True)
    for entry in store_files:
        entry.unlink(missing_ok=True)


def harvest(
    base: Any,
    edited: Any,
    corpus: CorpusSource,
    config: HarvestConfig,
    out_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> ActivationStore:
    """Harvest paired activations of ``base`` and ``edited`` on ``corpus`` into a store.

    Models are TransformerLens objects or names / local folders (booted with TransformerBridge).
    If ``out_dir`` holds an unfinished harvest with the same config, it is resumed; a finished
    one is returned as is. ``on_shard(i)`` is called after shard i is committed. A store belongs to
    one corpus: reusing or resuming it with another is refused (ForeignOutputError, a CheckpointError).
    ``out_dir`` is locked while harvesting: a second harvest into it fails at once (OutputLockedError).
    ``config``: a HarvestConfig or its mapping (a YAML ``harvest`` section).
    """
    config = HarvestConfig.of(config)
    # Before the models load: a new store reads the corpus twice (a resume or a complete store, once or never).
    if is_one_shot(corpus) and (overwrite or out_dir is None or not (Path(out_dir) / MANIFEST).is_file()):
        require_reiterable(corpus, TWO_PASSES)
    dist_ctx = distributed_context(config.device)
    if dist_ctx.is_distributed:  # under torchrun: this rank's share, see activations/sharded.py
        config = config.replace(device=str(dist_ctx.device(config.device)))
    with dist_ctx.together("while loading the models"):  # a rank that cannot load them stops every rank
        ctx = HarvestContext.build(base, edited, config)
    if dist_ctx.is_distributed:
        if out_dir is None:
            raise ConfigError("A harvest under torchrun needs out_dir: one folder that every rank writes into.")
        # Rank 0 holds the store's lock for the job; if another job has it, every rank stops.
        with main_rank_lock(dist_ctx, out_dir, "out_dir (--out)"):
            return harvest_sharded(ctx, corpus, config, Path(out_dir), dist_ctx, overwrite=overwrite,
                                   progress=progress, on_shard=on_shard)
    path = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mneme-activations-"))
    with output_lock(path, "out_dir (--out)"):
        if not overwrite and _partial_sharded(path):  # several ranks' unfinished harvest: finish it alone
            return harvest_sharded(ctx, corpus, config, path, dist_ctx, progress=progress, on_shard=on_shard)
        return _harvest_locked(ctx, corpus, config, path, overwrite=overwrite, progress=progress, on_shard=on_shard)


def _partial_sharded(path: Path) -> bool:
    """Whether ``path`` holds an unfinished harvest of several ranks (activations/sharded.py)."""
    if not (path / MANIFEST).is_file():
        return False
    manifest = read_manifest(path)
    return not manifest["complete"] and "world_size" in manifest


def _harvest_locked(ctx: HarvestContext, corpus: CorpusSource, config: HarvestConfig, path: Path, *,
                    overwrite: bool, progress: bool, on_shard: Callable[[int], None] | None) -> ActivationStore:
    if overwrite:
        clear_store_folder(path)
    remove_stale_temporaries(path)

    if (path / MANIFEST).exists():
        manifest = read_manifest(path)
        _check_resumable(manifest, ctx, path)
        check_same_corpus(manifest, corpus, path)
        if manifest["complete"]:
            logger.info("Activation store %s is already complete (%d rows); nothing to do.", path, manifest["n_tokens"])
            return ActivationStore(path)
        require_room_for_store(path, config, ctx.d_model)
        stats = NormalizationStats.from_dict(manifest["normalization"])
        logger.info("Resuming harvest into %s after %d windows (%d shards).", path, manifest["n_windows"], len(manifest["shards"]))
    else:
        if not overwrite and store_folder_entries(path):  # with overwrite: a store's folder, its other files kept
            raise foreign_folder_error(path)
        require_room_for_store(path, config, ctx.d_model)
        stats = ctx.estimate_normalization(corpus)
        manifest = _new_manifest(ctx, corpus, stats)
        write_manifest(path, manifest)

    store_dtype = _STORE_DTYPES[config.dtype]
    dropped_ids = ctx.dropped_ids()
    pending: list[BatchRows] = []
    pending_rows = 0
    counts = dict.fromkeys(COUNT_KEYS, 0)
    windows_end = int(manifest["n_windows"])

    def commit(final: bool) -> None:
        nonlocal pending, pending_rows, counts
        if pending_rows:
            index = len(manifest["shards"])
            tensors = shard_tensors(pending, store_dtype)
            file = write_shard(path, index, tensors)
            manifest["shards"].append({"file": file, "n_rows": pending_rows, "windows_end": windows_end})
            manifest["n_tokens"] += pending_rows
        for key, value in counts.items():
            manifest[key] += value
        manifest["n_windows"] = windows_end
        manifest["complete"] = final
        write_manifest(path, manifest)
        committed = pending_rows
        pending, pending_rows = [], 0
        counts = dict.fromkeys(counts, 0)
        if committed and on_shard is not None:
            on_shard(len(manifest["shards"]) - 1)

    bar = tqdm(
        total=config.token_budget, initial=windows_end * config.context_length, unit="tok",
        desc="harvest", disable=not progress,
    )
    try:
        for i, windows in enumerate(ctx.windows(corpus, start_window=windows_end)):
            rows = add_filtered_batch(ctx.run_batch(windows, i, dropped_ids), stats, config.outlier_factor, counts)
            windows_end = rows.windows_end
            pending.append(rows)
            pending_rows += rows.activations.shape[0]
            bar.update(len(windows) * config.context_length)
            if pending_rows >= config.rows_per_shard:
                commit(final=False)
        commit(final=True)
    finally:
        bar.close()
    if manifest["n_tokens"] == 0:
        raise EmptyCorpusError(f"The harvest into {path} kept no rows: every position was filtered out.")
    log_harvested(manifest, ctx.hook_name, config.layer, path)
    return ActivationStore(path)


def log_harvested(manifest: dict[str, Any], hook_name: str, layer: int, path: Path) -> None:
    """The one line a finished harvest logs (one process, or rank 0 of a sharded one)."""
    logger.info(
        "Harvested %d paired activations (%s, layer %d) into %s (%d shards; %d outliers, %d special tokens dropped).",
        manifest["n_tokens"], hook_name, layer, path, len(manifest["shards"]),
        manifest["outliers_dropped"], manifest["special_tokens_dropped"],
    )
