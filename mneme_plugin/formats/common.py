"""Shared helpers of the format readers: checked JSON / tensor reading and hub resolution."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from mneme_plugin.crosscoder.base import check_weights
from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import read_json as read_stage_json

TORCH_DTYPES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; CheckpointError naming the file otherwise."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing: expected {what}.")
    data = read_stage_json(path, f"expected {what}")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected {what} (a JSON object).")
    return data


def load_tensors(path: Path, what: str, mapped: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``'d state dict (loaded with weights_only).
    ``mapped``: a ``torch.save`` file is memory-mapped, not read (for its names; a checkpoint may be gigabytes),
    unless it is of torch's legacy (non-zip) format, which cannot be mapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: expected {what}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            try:
                data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped)
            except RuntimeError:
                if not mapped:
                    raise
                data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise many error types on corrupt files
        raise CheckpointError(f"{path} is not a readable tensor file ({type(err).__name__}: {err}); expected {what}.") from err
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a mapping of names to tensors; expected {what}.")
    return dict(data)


def require_tensor(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...] | None, path: Path,
                   what: str) -> torch.Tensor:
    """The weight tensor ``name`` of a state dict: present, of ``shape`` (if given), floating point and finite
    (a threshold may be +inf); CheckpointError naming ``path`` and the tensor otherwise."""
    if name not in tensors:
        raise CheckpointError(f"{path} lacks tensor {name!r}; expected {what} (found {sorted(tensors)[:12]}).")
    t = tensors[name]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} ({what}).")
    check_weights(path, {name: t})
    return t


def config_int(cfg: dict[str, Any], key: str, path: Path, what: str, default: Any = None) -> int:
    """``cfg[key]`` as an int (``default`` when absent and given); CheckpointError naming ``path`` otherwise."""
    value = cfg.get(key, default)
    if key not in cfg and default is None:
        raise CheckpointError(f"{path} lacks {key!r}; expected {what}.")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        value_ok = False
    else:
        try:
            value_ok = float(value) == int(float(value))
        except (ValueError, OverflowError):
            value_ok = False
    if not value_ok:
        raise CheckpointError(f"{path}: {key} = {value!r} is not a whole number; expected {what}. "
                              "The file was edited or damaged; restore it from where it came from.")
    return int(float(value))


def config_number(cfg: dict[str, Any], key: str, path: Path, what: str, default: float) -> float:
    """``cfg[key]`` as a float (``default`` when absent); CheckpointError naming ``path`` otherwise."""
    value = cfg.get(key, default)
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        return float(value)
    except ValueError:
        raise CheckpointError(f"{path}: {key} = {value!r} is not a number; expected {what}.") from None


def scalar_tensor(tensors: dict[str, torch.Tensor], name: str, path: Path, what: str) -> torch.Tensor:
    """A one-element tensor of a state dict; CheckpointError naming ``path`` if it holds several."""
    t = tensors[name]
    if t.numel() != 1:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected a scalar ({what}).")
    return t


def scalar_int(tensors: dict[str, torch.Tensor], name: str, path: Path, what: str) -> int:
    """A one-element tensor holding a whole number (an int tensor, or a float one of a whole value), as an int;
    CheckpointError naming ``path`` otherwise (NaN, a fraction, several values)."""
    value = scalar_tensor(tensors, name, path, what).item()
    if isinstance(value, bool) or not (isinstance(value, int) or (math.isfinite(value) and value == int(value))):
        raise CheckpointError(f"{path}: tensor {name!r} holds {value!r}, not a whole number ({what}). The file was "
                              "edited or damaged; restore it from where it came from.")
    return int(value)


def dtype_name(t: torch.Tensor, path: Path) -> str:
    if t.dtype not in TORCH_DTYPES:
        raise CheckpointError(f"{path}: weights have dtype {t.dtype}, expected one of {sorted(TORCH_DTYPES.values())}.")
    return TORCH_DTYPES[t.dtype]


def looks_like_hub_id(source: str) -> bool:
    return (
        not os.path.exists(source)
        and not source.startswith((".", "/", "~"))
        and source.count("/") >= 1
        and all(part for part in source.split("/"))
    )


def download_from_hub(source: str, subfolder: str | None = None, revision: str | None = None) -> Path:
    """Local folder of a hub repo ``org/name`` (``org/name/sub/folder`` selects a subfolder)."""
    parts = source.split("/")
    repo_id = "/".join(parts[:2])
    if len(parts) > 2:
        extra = "/".join(parts[2:])
        subfolder = f"{extra}/{subfolder}" if subfolder else extra
    try:
        from huggingface_hub import snapshot_download

        allow = [f"{subfolder.strip('/')}/*"] if subfolder else None
        root = Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=allow))
    except Exception as err:  # offline, missing repo, auth...
        raise CheckpointError(
            f"{source}: not a local path, and downloading the hub repo {repo_id!r} failed "
            f"({type(err).__name__}: {err}). Pass a local folder, or go online / log in to the hub."
        ) from err
    path = root / subfolder if subfolder else root
    if not path.exists():
        raise CheckpointError(f"The hub repo {repo_id!r} has no folder {subfolder!r}.")
    return path
