"""Step checkpoints of a training loop, in its output folder: ``checkpoints/step_XXXXXXXX/``.

Shared by the crosscoder's training (``crosscoder.training``) and the interventions' trainers
(``interventions.checkpoints``). A checkpoint folder appears under its final name by an atomic,
fsynced rename (``files.atomic_directory``), so one that is there is whole: a killed writer leaves
only a hidden temporary folder, which the next write removes. The newest ``keep`` are kept. State
files are read with ``torch.load(weights_only=True)``: tensors and plain containers, never pickle.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import atomic_directory

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
_PREFIX = "step_"


def checkpoint_dirs(folder: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints in ``folder/checkpoints``, oldest first."""
    root = Path(folder) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def latest_checkpoint(folder: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``folder`` (None when there is none)."""
    found = checkpoint_dirs(folder)
    return found[-1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    """The number of optimiser steps done when ``checkpoint`` was written (from its name)."""
    return int(checkpoint.name[len(_PREFIX):])


def write_checkpoint(folder: str | os.PathLike[str], step: int, writer: Callable[[Path], object], keep: int) -> Path:
    """Write ``folder/checkpoints/step_<step>/`` with ``writer(tmp_dir)`` (atomically and durably),
    then remove all but the newest ``keep`` checkpoints."""
    final = Path(folder) / CHECKPOINT_DIR / f"{_PREFIX}{step:08d}"
    atomic_directory(final, writer, overwrite=True, durable=True)
    for old in checkpoint_dirs(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path, remedy: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """A state file written with ``torch.save`` (tensors and plain containers), read without pickle;
    a missing or unreadable one is a CheckpointError naming it and ``remedy``."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a training checkpoint; {remedy}.") from err
    except Exception as err:
        raise CheckpointError(f"{path} could not be read ({err}); {remedy}.") from err


def config_differences(previous: Any, now: Any, prefix: str = "") -> list[str]:
    """``section.field: stored X vs now Y`` for every field of two nested mappings that differs."""
    if not (isinstance(previous, dict) and isinstance(now, dict)):
        return [] if previous == now else [f"{prefix.rstrip('.') or 'value'}: stored {previous!r} vs now {now!r}"]
    out = []
    for key in sorted(set(previous) | set(now), key=str):
        a, b = previous.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r} vs now {b!r}")
    return out


__all__ = ["CHECKPOINT_DIR", "STATE_FILE", "checkpoint_dirs", "checkpoint_step", "config_differences",
           "latest_checkpoint", "load_state", "write_checkpoint"]
