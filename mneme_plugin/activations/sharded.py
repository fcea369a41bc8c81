"""Sharded harvesting under torchrun: each rank harvests a disjoint share of the corpus into one store.

Forward batch i (``batch_size`` windows, the same batches as one process) belongs to rank
i mod W. Rank 0 estimates the normalisation (so every rank filters with the same thresholds as one
process would) and writes the store's manifest, marked incomplete with the world size. Each rank
writes its own shards (``rank003_shard_00012.safetensors``) and its own progress file
(``manifest.rank003.json``, rewritten atomically after each shard), so a killed rank resumes where
it stopped. When every rank is done, rank 0 merges the shard lists into the manifest (one atomic
write, shards ordered by their first window) and removes the progress files.

The rows are the rows one process harvests (same batches, same filters); only how they are cut into
shards differs. A partial store resumes with any number of processes: with the same number, each
rank continues from its progress file; with another (or a partial store of one process resumed
under torchrun, or a partial sharded store resumed by one process), rank 0 first folds what was
harvested into the manifest's ``carried`` part (its shards kept, their forward batches marked
done) and the new ranks share the batches still to do, writing shards of a new generation
(``g01_rank000_shard_00000.safetensors``).

Each progress file records the generation it belongs to; a progress file of another generation
(left behind when rank 0 was killed between writing a fold's manifest and removing the old ranks'
progress files) is ignored, so a fold cut short at any point resumes to the rows of one process.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.activations.corpus import CorpusSource
from mneme_plugin.activations.normalization import NormalizationStats
from mneme_plugin.activations.manifest import MANIFEST, read_manifest, shard_entries_problem, write_manifest
from mneme_plugin.activations.store import ActivationStore, write_shard
from mneme_plugin.distributed import DistributedContext
from mneme_plugin.errors import CheckpointError, EmptyCorpusError
from mneme_plugin.files import atomic_write_text

COUNT_KEYS = ("outliers_dropped", "special_tokens_dropped", "padding_dropped", "n_corpus_tokens")


def rank_manifest_name(rank: int) -> str:
    return f"manifest.rank{rank:03d}.json"


def rank_shard_name(rank: int, index: int, generation: int = 0) -> str:
    prefix = f"g{generation:02d}_" if generation else ""  # a resume with another number of ranks
    return f"{prefix}rank{rank:03d}_shard_{index:05d}.safetensors"


_SHARD_GENERATION = re.compile(r"(?:g(\d+)_)?rank\d+_shard_\d+\.safetensors")


def _progress_generation(state: dict[str, Any]) -> int | None:
    """The generation a progress file belongs to: its ``generation`` field, or for a file written before
    the field existed, the one its shards' names say (None: it lists no shard, or shards of several)."""
    if "generation" in state:
        return int(state["generation"])
    found = set()
    for shard in state["shards"]:
        match = _SHARD_GENERATION.fullmatch(shard["file"])
        if match is None:
            return None
        found.add(int(match.group(1) or 0))
    return found.pop() if len(found) == 1 else None


def _prepare(ctx: Any, corpus: CorpusSource, config: HarvestConfig, path: Path, world_size: int,
             overwrite: bool) -> dict[str, Any]:
    """Rank 0: the store's manifest (new, or the partial one to resume); never touches shards."""
    from mneme_plugin.activations.harvest import (
        _check_resumable,
        _new_manifest,
        check_same_corpus,
        clear_store_folder,
        foreign_folder_error,
        require_room_for_store,
        store_folder_entries,
    )

    if overwrite:
        clear_store_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / MANIFEST).exists():
        manifest = read_manifest(path)
        _check_resumable(manifest, ctx, path)
        check_same_corpus(manifest, corpus, path)
        if not manifest["complete"]:
            require_room_for_store(path, config, ctx.d_model)
        if not manifest["complete"] and manifest.get("world_size") != world_size:
            _fold(path, manifest, world_size)
        return manifest
    if not overwrite and store_folder_entries(path):  # with overwrite: a store's folder, its other files kept
        raise foreign_folder_error(path)
    require_room_for_store(path, config, ctx.d_model)
    manifest = _new_manifest(ctx, corpus, ctx.estimate_normalization(corpus))
    manifest["world_size"] = world_size
    write_manifest(path, manifest)
    return manifest


def _fold(path: Path, manifest: dict[str, Any], world_size: int) -> None:
    """Rank 0, resuming a partial store with another number of processes: what was harvested so far
    becomes the manifest's ``carried`` part (shards with their first window, the forward batches
    done, the counts), the old progress files go, and the new ranks start a new generation."""
    batch_size = int(manifest["config"]["batch_size"])
    carried = manifest.get("carried") or {"shards": [], "done_batches": [], "windows_end": 0,
                                          **dict.fromkeys(COUNT_KEYS, 0)}
    done = set(carried["done_batches"])
    if "world_size" not in manifest:  # one process's partial store: contiguous windows, listed shards
        start = 0
        for shard in manifest["shards"]:
            carried["shards"].append({**shard, "windows_start": start})
            start = shard["windows_end"]
        n_windows = int(manifest["n_windows"])
        done |= set(range(-(-n_windows // batch_size)))
        carried["windows_end"] = max(carried["windows_end"], n_windows)
        for key in COUNT_KEYS:
            carried[key] += int(manifest.get(key, 0))
        manifest["shards"], manifest["n_tokens"], manifest["n_windows"] = [], 0, 0
    else:
        old_world = int(manifest["world_size"])
        for rank in range(old_world):
            state = _rank_progress(path, rank, int(manifest.get("generation", 0)))  # this generation's only
            carried["shards"] += state["shards"]
            done |= set(range(rank, int(state["next_batch"]), old_world))
            carried["windows_end"] = max(carried["windows_end"], int(state.get("windows_end", 0)))
            for key in COUNT_KEYS:
                carried[key] += int(state[key])
    carried["done_batches"] = sorted(done)
    _check_distinct(carried["shards"], path)
    manifest.update(carried=carried, world_size=world_size, generation=int(manifest.get("generation", 0)) + 1)
    # Killed before this write, the resume folds again from the same files; killed after it (or while the
    # old progress files go), they are of the previous generation and _rank_progress ignores them.
    write_manifest(path, manifest)
    _remove_progress_files(path)


def _remove_progress_files(path: Path) -> None:
    for stale in path.glob("manifest.rank*.json"):
        stale.unlink(missing_ok=True)


def _check_distinct(shards: list[dict[str, Any]], path: Path) -> None:
    """Refuse a shard list naming a file twice (its rows would be read twice): the store's progress is inconsistent."""
    seen: set[str] = set()
    twice: set[str] = set()
    for shard in shards:
        (twice if shard["file"] in seen else seen).add(shard["file"])
    if twice:
        raise CheckpointError(
            f"The harvest into {path} lists the shards {sorted(twice)} twice: its progress files and manifest disagree. "
            "Delete the store to start over (or pass overwrite=True).")


def _rank_progress(path: Path, rank: int, generation: int = 0) -> dict[str, Any]:
    """Rank ``rank``'s progress in the store's ``generation`` (a fresh state if it has none yet).

    A progress file of another generation is stale (left by a fold killed before it removed it) and is
    ignored. One written before progress files recorded their generation is dated by its shards' names;
    one they cannot date (no shard, or shards of several generations) counts only in an unfolded store
    (generation 0): elsewhere it is ignored and the rank harvests its batches of this generation again."""
    fresh = {"rank": rank, "generation": generation, "shards": [], "next_batch": 0, "done": False,
             **dict.fromkeys(COUNT_KEYS, 0)}
    file = path / rank_manifest_name(rank)
    if not file.is_file():
        return fresh
    try:
        state = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is corrupt ({err}); delete the store to start over.") from err
    problem = shard_entries_problem(state.get("shards")) if isinstance(state, dict) else "not a JSON object"
    if not problem and not isinstance(state.get("generation", 0), int):
        problem = f"generation is {state['generation']!r}, expected a whole number"
    if problem:
        raise CheckpointError(f"{file} is corrupt: {problem}. Delete the store to start over, or restore the file.")
    found = _progress_generation(state)
    if found is None and generation == 0:  # an unfolded store has had no other generation
        found = 0
    if found != generation:
        return fresh
    state["generation"] = generation
    return state


def harvest_sharded(
    ctx: Any,
    corpus: CorpusSource,
    config: HarvestConfig,
    path: Path,
    dist_ctx: DistributedContext,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> ActivationStore:
    """This rank's share of a harvest into ``path`` (``ctx`` is the rank's ``HarvestContext``)."""
    from mneme_plugin.activations.harvest import _STORE_DTYPES, add_filtered_batch, shard_tensors

    rank, world = dist_ctx.rank, dist_ctx.world_size
    # Rank 0 prepares; an error there is raised on every rank instead of leaving them waiting.
    manifest: dict[str, Any] = dist_ctx.on_main(lambda: _prepare(ctx, corpus, config, path, world, overwrite))
    if manifest["complete"]:
        return ActivationStore(path)
    stats = NormalizationStats.from_dict(manifest["normalization"])
    done_before = set(manifest.get("carried", {}).get("done_batches", []))  # by an earlier number of ranks
    generation = int(manifest.get("generation", 0))

    state = _rank_progress(path, rank, generation)
    store_dtype = _STORE_DTYPES[config.dtype]
    dropped_ids = ctx.dropped_ids()
    pending: list[Any] = []
    pending_first_window: int | None = None
    counts = dict.fromkeys(COUNT_KEYS, 0)
    own_end = 0  # one past the last window of this rank's batches so far

    def commit(next_batch: int, done: bool) -> None:
        nonlocal pending, counts, pending_first_window
        n_rows = sum(r.activations.shape[0] for r in pending)
        if n_rows:
            index = len(state["shards"])
            tensors = shard_tensors(pending, store_dtype)
            file = rank_shard_name(rank, index, generation)
            write_shard(path, index, tensors, name=file)
            state["shards"].append({"file": file, "n_rows": n_rows, "windows_end": own_end,
                                    "windows_start": pending_first_window})
        for key, value in counts.items():
            state[key] += value
        state["next_batch"], state["done"] = next_batch, done
        atomic_write_text(path / rank_manifest_name(rank), json.dumps(state, indent=2), durable=True)
        pending, counts, pending_first_window = [], dict.fromkeys(COUNT_KEYS, 0), None
        if n_rows and on_shard is not None:
            on_shard(len(state["shards"]) - 1)

    # The ranks meet after every round of W forward batches (one flag all-reduced), so an error on
    # one rank stops the others within a round, with its message (DistributedContext.together).
    # A rank done before a resume still walks the rounds, skipping every batch.
    already_done = state["done"]
    bar = tqdm(total=config.token_budget, unit="tok", desc=f"harvest (rank {rank}/{world})",
               disable=not (progress and dist_ctx.is_main and not already_done))
    batches = enumerate(ctx.windows(corpus))
    pending_rows, next_batch, finished = 0, state["next_batch"], False
    try:
        while not finished:
            with dist_ctx.together("while harvesting"):
                for i, windows in batches:  # one round, resuming the iterator where the last one stopped
                    # Rank 0's place in the corpus: every batch counts once as the loop passes it (other
                    # ranks' batches, and those done before a resume, are skipped at once).
                    bar.update(len(windows) * config.context_length)
                    if not already_done:
                        state["windows_end"] = windows[-1].index + 1  # the corpus's windows, for n_windows
                    if already_done or i % world != rank or i < state["next_batch"] or i in done_before:
                        if i % world == world - 1:
                            break
                        continue
                    own_end, next_batch = windows[-1].index + 1, i + 1
                    rows = add_filtered_batch(ctx.run_batch(windows, i, dropped_ids), stats, config.outlier_factor,
                                              counts)
                    if pending_first_window is None:
                        pending_first_window = windows[0].index
                    pending.append(rows)
                    pending_rows += rows.activations.shape[0]
                    if pending_rows >= config.rows_per_shard:
                        commit(next_batch, done=False)
                        pending_rows = 0
                    if i % world == world - 1:
                        break
                else:  # the corpus is through
                    if not already_done:
                        commit(next_batch, done=True)
                    finished = True
    finally:
        bar.close()

    # Every rank is done (the last round's meeting); rank 0 merges, an error there reaches every rank.
    dist_ctx.on_main(lambda: _merge(path, manifest, world))
    store = ActivationStore(path)
    if store.num_rows == 0:
        raise EmptyCorpusError(f"The harvest into {path} kept no rows: every position was filtered out.")
    if dist_ctx.is_main:
        from mneme_plugin.activations.harvest import log_harvested

        log_harvested(store.manifest, ctx.hook_name, config.layer, path)
    return store


def _merge(path: Path, manifest: dict[str, Any], world: int) -> None:
    """Rank 0, once every rank is done: one manifest listing every rank's shards (atomic)."""
    states = [_rank_progress(path, rank, int(manifest.get("generation", 0))) for rank in range(world)]
    unfinished = [s["rank"] for s in states if not s["done"]]
    if unfinished:
        # Every rank has finished its loop by now (the last round's meeting): rank 0 not reading it in the
        # folder means the ranks write to different folders (nodes without a shared filesystem).
        missing = [rank for rank in unfinished if not (path / rank_manifest_name(rank)).is_file()]
        raise CheckpointError(
            f"Ranks {unfinished} finished their share of the harvest into {path}, but rank 0 does not find it there "
            f"({'no ' + ', '.join(rank_manifest_name(r) for r in missing) if missing else 'their progress files say otherwise'}): "
            "every rank must write to one folder that all of them see (on several nodes, a shared filesystem at the "
            "same path). Harvest into such a folder; the shards each node wrote here are not a store.")
    carried = manifest.pop("carried", None) or {"shards": [], "windows_end": 0, **dict.fromkeys(COUNT_KEYS, 0)}
    shards = sorted(carried["shards"] + [s for state in states for s in state["shards"]],
                    key=lambda s: s["windows_start"])
    _check_distinct(shards, path)
    manifest["shards"] = [{"file": s["file"], "n_rows": s["n_rows"], "windows_end": s["windows_end"]} for s in shards]
    manifest["n_tokens"] = sum(s["n_rows"] for s in shards)
    manifest["n_windows"] = max([carried["windows_end"]] + [state.get("windows_end", 0) for state in states])
    for key in COUNT_KEYS:
        manifest[key] = carried[key] + sum(state[key] for state in states)
    manifest["complete"] = True
    manifest.pop("world_size", None)
    manifest.pop("generation", None)
    write_manifest(path, manifest)
    _remove_progress_files(path)  # this generation's, and any an interrupted fold left
