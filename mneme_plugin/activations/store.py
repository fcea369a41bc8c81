"""On-disk activation store: ``manifest.json`` + ``shard_XXXXX.safetensors``.

Shards and the manifest are written atomically (temp file in the same folder, fsync, os.replace),
and the manifest is rewritten after each shard, so a reader (or a resumed harvest) only ever sees
shards that were completely written.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import atomic_write, atomic_write_text, read_json

logger = logging.getLogger("mneme_plugin")

FORMAT_NAME = "mneme-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_KEYS = ("activations", "tokens", "positions", "windows")
_REQUIRED_MANIFEST_KEYS = (
    "format", "version", "d_model", "dtype", "n_tokens", "shards", "normalization", "complete",
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor], name: str | None = None) -> str:
    """Write one shard atomically (as ``name``, default ``shard_name(index)``); return its file name."""
    name = name or shard_name(index)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(folder / name, lambda tmp: save_file(tensors, str(tmp)), durable=True)
    return name


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2), durable=True)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check a store manifest; CheckpointError naming the file if it is not one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        from mneme_plugin.describe import folder_kind

        kind = folder_kind(folder)
        raise CheckpointError(
            f"{Path(folder)} is not an activation store: "
            + (f"it is {kind}." if kind else
               f"{path} does not exist (expected a folder written by `mneme harvest` / "
               "mneme_plugin.activations.harvest).")
        )
    manifest = read_json(path, "harvest again into a new folder")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path} is not a {FORMAT_NAME!r} manifest (format field: {found!r}).")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {manifest.get('version')!r}; this mneme-plugin reads version {FORMAT_VERSION}."
        )
    missing = [k for k in _REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"{path} is corrupt: missing keys {missing}.")
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{path} is corrupt: {problem}. Harvest again into a new folder, or restore the file.")
    return manifest


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def inside_store(name: str) -> bool:
    """Whether a shard entry's ``file`` names a file inside the store folder: a relative path without
    ``..`` (read as a POSIX and as a Windows path), so a manifest cannot point a reader at files elsewhere."""
    if name in ("", "."):
        return False
    return not any(p.anchor or ".." in p.parts for p in (PurePosixPath(name), PureWindowsPath(name)))


def shard_entries_problem(shards: Any) -> str | None:
    """What is wrong with a list of shard entries (``{"file": NAME, "n_rows": N}``), None if nothing."""
    if not isinstance(shards, list):
        return f"shards is a {type(shards).__name__}, expected a list"
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not _whole(entry.get("n_rows")):
            return f"shards[{i}] is {entry!r}, expected {{\"file\": NAME, \"n_rows\": WHOLE NUMBER}}"
        if not inside_store(entry["file"]):
            return (f"shards[{i}] names {entry['file']!r}, outside the store (a shard is a file in the store's "
                    "folder, named relative to it)")
    return None


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the types of a manifest's entries that readers rely on (None if nothing)."""
    if not _whole(manifest["d_model"]) or manifest["d_model"] == 0:
        return f"d_model is {manifest['d_model']!r}, expected a positive whole number"
    problem = shard_entries_problem(manifest["shards"])
    if problem:
        return problem
    carried = manifest.get("carried")  # a partial sharded harvest's shards of earlier ranks
    if isinstance(carried, dict) and "shards" in carried:
        problem = shard_entries_problem(carried["shards"])
        if problem:
            return f"carried.{problem}"
    norm = manifest["normalization"]
    factors = norm.get("scale_factors") if isinstance(norm, dict) else None
    if not (isinstance(factors, list) and len(factors) == 2
            and all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors)):
        return "normalization.scale_factors is missing or not two numbers"
    return None


def shard_problem(file: Path, n_rows: int) -> str | None:
    """What is wrong with a shard file, from its safetensors header only (None if it looks whole).

    The header states every tensor's byte range, so a truncated file is caught without reading the data.
    """
    if not file.is_file():
        return f"{file.name} is missing"
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        data_end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: v["shape"] for k, v in tensors.items()}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return f"{file.name} is not a readable safetensors file ({err})"
    if size < 8 + header_len + data_end:
        return f"{file.name} is truncated ({size:,} of {8 + header_len + data_end:,} bytes)"
    missing = [k for k in SHARD_KEYS if k not in shapes]
    if missing:
        return f"{file.name} lacks tensors {missing}"
    if any(not shapes[k] or shapes[k][0] != n_rows for k in SHARD_KEYS):
        return f"{file.name} does not hold the {n_rows:,} rows the manifest lists"
    return None


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
