"""The activation store's manifest and file names, and the checks that need only them (no torch):
``mneme info`` and a run's status read a store through this module; ``store.ActivationStore`` reads
its shards. The manifest is written atomically after each shard (``store`` and ``harvest``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import atomic_write_text, read_json

FORMAT_NAME = "mneme-activations"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_KEYS = ("activations", "tokens", "positions", "windows")
_REQUIRED_MANIFEST_KEYS = (
    "format", "version", "d_model", "dtype", "n_tokens", "shards", "normalization", "complete",
)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


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
