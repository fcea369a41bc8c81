"""On-disk activation store: ``manifest.json`` (``manifest``) + ``shard_XXXXX.safetensors``.

Shards and the manifest are written atomically (temp file in the same folder, fsync, os.replace),
and the manifest is rewritten after each shard, so a reader (or a resumed harvest) only ever sees
shards that were completely written.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mneme_plugin.activations.manifest import SHARD_KEYS, read_manifest, shard_name, shard_problem
from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import atomic_write

logger = logging.getLogger("mneme_plugin")


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor], name: str | None = None) -> str:
    """Write one shard atomically (as ``name``, default ``shard_name(index)``); return its file name."""
    name = name or shard_name(index)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(folder / name, lambda tmp: save_file(tensors, str(tmp)), durable=True)
    return name


class ActivationStore:
    """Read access to a harvested store of paired activations (rows of shape (2, d))."""

    def __init__(self, path: str | Path, cache_shards: int = 8) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_size = max(1, cache_shards)
        self._shard_rows = np.array([int(s["n_rows"]) for s in self.manifest["shards"]], dtype=np.int64)
        self._perm_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={self.num_rows}, d_model={self.d_model})"

    def __len__(self) -> int:
        return self.num_rows

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def num_rows(self) -> int:
        return int(self._shard_rows.sum())

    @property
    def num_shards(self) -> int:
        return len(self._shard_rows)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def shard_problems(self) -> list[str]:
        """Shards that are missing, truncated or do not match the manifest (reads their headers only)."""
        problems = (shard_problem(self.path / s["file"], int(s["n_rows"])) for s in self.manifest["shards"])
        return [p for p in problems if p is not None]

    def require_complete(self, allow_partial: bool = False, use: str = "this") -> None:
        """CheckpointError if a shard is damaged, or if the harvest did not finish unless ``allow_partial``
        (then a warning). Checked up front, so a long job does not fail at its first damaged shard."""
        problems = self.shard_problems()
        if problems:
            raise CheckpointError(
                f"The activation store {self.path} is damaged: {'; '.join(problems)}. Harvest it again "
                "(--overwrite), or restore the files."
            )
        if self.complete:
            return
        what = (f"{self.path} is a partial activation store: its harvest stopped after {self.num_rows:,} rows "
                f"({self.manifest.get('n_windows', 0):,} windows)")
        if not allow_partial:
            raise CheckpointError(
                f"{what}. Resume the harvest (run it again with the same options) before {use}, or pass "
                "allow_partial=True (--allow-partial) to use the rows it has."
            )
        logger.warning("%s; using it as asked (allow_partial).", what)

    @property
    def scale_factors(self) -> torch.Tensor:
        """Per-model factors (2,) [base, edited] that make E||x|| = sqrt(d_model)."""
        return torch.tensor(self.manifest["normalization"]["scale_factors"], dtype=torch.float32)

    def load_shard(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of shard ``index``: activations (n,2,d), tokens, positions, windows (n,)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        if not 0 <= index < self.num_shards:
            raise IndexError(f"Shard {index} out of range: the store has {self.num_shards} shards.")
        entry = self.manifest["shards"][index]
        file = self.path / entry["file"]
        try:
            data = load_file(str(file))
        except FileNotFoundError as err:
            raise CheckpointError(f"Shard {file} listed in the manifest is missing.") from err
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"Shard {file} is corrupt (not a readable safetensors file): {err}") from err
        missing = [k for k in SHARD_KEYS if k not in data]
        n = int(entry["n_rows"])
        if missing:
            raise CheckpointError(f"Shard {file} is corrupt: missing tensors {missing} (expected {list(SHARD_KEYS)}).")
        acts = data["activations"]
        if tuple(acts.shape) != (n, 2, self.d_model) or any(data[k].shape[0] != n for k in SHARD_KEYS[1:]):
            raise CheckpointError(
                f"Shard {file} is corrupt: activations have shape {tuple(acts.shape)}, expected "
                f"({n}, 2, {self.d_model}) per the manifest."
            )
        self._cache[index] = data
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return data

    def all_activations(self, max_rows: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All rows (in store order) as one (n, 2, d) tensor, optionally only the first ``max_rows``."""
        parts, total = [], 0
        for i in range(self.num_shards):
            if max_rows is not None and total >= max_rows:
                break
            acts = self.load_shard(i)["activations"]
            if max_rows is not None:
                acts = acts[: max_rows - total]
            parts.append(acts.to(dtype))
            total += acts.shape[0]
        if not parts:
            return torch.empty(0, 2, self.d_model, dtype=dtype)
        return torch.cat(parts)

    # -- shuffled iteration --------------------------------------------------------------------
    # Epoch e's row order: a permutation of the shards (seeded by seed, e), cut into groups of
    # `shuffle_shards` consecutive shards, rows permuted within each group (seeded by seed, e, g).
    # Batch s is rows [s*B, (s+1)*B) of the concatenated epochs, so any batch can be computed
    # directly from its step: resuming at start_step gives exactly the batches of a full run.

    def _epoch_layout(self, seed: int, epoch: int, shuffle: bool, shuffle_shards: int) -> tuple[np.ndarray, list[np.ndarray]]:
        if shuffle:
            order = np.random.default_rng([seed, epoch, 0]).permutation(self.num_shards)
        else:
            order = np.arange(self.num_shards)
        groups = [order[i : i + shuffle_shards] for i in range(0, len(order), shuffle_shards)]
        group_sizes = np.array([self._shard_rows[g].sum() for g in groups], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(group_sizes)]), groups

    def _group_rows(self, seed: int, epoch: int, g: int, group: np.ndarray, shuffle: bool) -> np.ndarray:
        """Flat (shard, row) pairs of one group, in iteration order, as an (n, 2) array."""
        key = (seed, epoch, g, shuffle, tuple(group.tolist()))
        if key in self._perm_cache:
            return self._perm_cache[key]
        pairs = np.concatenate(
            [np.stack([np.full(self._shard_rows[s], s), np.arange(self._shard_rows[s])], axis=1) for s in group]
        )
        if shuffle:
            pairs = pairs[np.random.default_rng([seed, epoch, 1, g]).permutation(len(pairs))]
        self._perm_cache[key] = pairs
        if len(self._perm_cache) > 4:
            self._perm_cache.popitem(last=False)
        return pairs

    def batch_rows(self, step: int, batch_size: int, seed: int = 0, shuffle: bool = True, shuffle_shards: int = 4) -> np.ndarray:
        """(shard, row) pairs (B, 2) of the batch at ``step``."""
        n = self.num_rows
        if n == 0:
            raise CheckpointError(f"The store at {self.path} holds no rows.")
        out: list[np.ndarray] = []
        start = step * batch_size
        end = start + batch_size
        pos = start
        while pos < end:
            epoch, offset = divmod(pos, n)
            bounds, groups = self._epoch_layout(seed, epoch, shuffle, shuffle_shards)
            g = int(np.searchsorted(bounds, offset, side="right") - 1)
            pairs = self._group_rows(seed, epoch, g, groups[g], shuffle)
            lo = offset - bounds[g]
            take = min(end - pos, len(pairs) - lo)
            out.append(pairs[lo : lo + take])
            pos += take
        return np.concatenate(out)

    def gather(self, pairs: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows given as (shard, row) pairs, in that order, as a (B, 2, d) tensor."""
        out = torch.empty(len(pairs), 2, self.d_model, dtype=dtype)
        for s in np.unique(pairs[:, 0]):
            sel = np.nonzero(pairs[:, 0] == s)[0]
            acts = self.load_shard(int(s))["activations"]
            out[torch.from_numpy(sel)] = acts[torch.from_numpy(pairs[sel, 1])].to(dtype)
        return out

    def iter_batches(
        self,
        batch_size: int,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        shuffle_shards: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """Yield (B, 2, d) batches forever (epochs follow each other), deterministic given seed.

        The batch at step s is the same whether iteration started at 0 or at ``start_step=s``.
        With ``world_size`` > 1 (data-parallel training), only rank ``rank``'s slice of each global
        batch is read: rows [rank*B/W, (rank+1)*B/W); the ranks' slices make up the global batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over {world_size} ranks (rank {rank}).")
        local = batch_size // world_size
        step = start_step
        while True:
            pairs = self.batch_rows(step, batch_size, seed, shuffle, shuffle_shards)
            if world_size > 1:
                pairs = pairs[rank * local : (rank + 1) * local]
            yield self.gather(pairs, dtype).to(device)
            step += 1
