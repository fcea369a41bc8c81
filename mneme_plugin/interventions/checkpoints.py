"""Checkpoints and resume of the interventions' training loops (``hf_rmu``, ``sft``), and the life of
their output folder.

While an intervention trains, its output folder holds only ``checkpoints/step_XXXXXXXX/`` (written
through ``mneme_plugin.checkpoints``: atomic, fsynced, the newest one kept), every
``checkpoint_every`` optimiser steps:

- ``trainer_state.pt``: the trained parameters only (RMU: the chosen layers' parameters; LoRA: the
  adapters; full fine-tuning: every parameter), the optimizer and scheduler states, the number of
  steps done (the data position: batches are a function of the config and the step), the torch RNG
  states and the training log so far;
- ``intervention.json``: what the run is (the config's result fields, the digests of the local
  model folder and data files it reads) and its step.

A run given the folder resumes from the newest checkpoint and ends with the uninterrupted run's
weights; a checkpoint of another config (or of a model folder or data file changed since) is
refused with what to do. ``train_and_save`` writes the finished model over the output folder in one
rename (``save_intervention``), which takes the checkpoints with it: a folder that holds a model is
finished, one that holds only ``checkpoints/`` is not. (Unlike the crosscoder's, these checkpoints
are not kept: they hold the optimizer state, twice the trained parameters, and a finished model
folder is never resumed.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mneme_plugin.checkpoints import (
    CHECKPOINT_DIR,
    STATE_FILE,
    checkpoint_step,
    config_differences,
    latest_checkpoint,
    load_state,
    write_checkpoint,
)
from mneme_plugin.config import ConfigMixin
from mneme_plugin.errors import CheckpointError, ConfigError, ForeignOutputError
from mneme_plugin.files import (
    LOCK_FILE, content_digest, output_lock, read_json, require_free_space, size_text, stat_digest, tree_size,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("mneme_plugin")

# Called after every optimiser step of an intervention with the step and its log record.
StepCallback = Callable[[int, dict[str, Any]], None]

CHECKPOINT_INFO = "intervention.json"
KEEP = 1  # checkpoints appear whole (atomic rename): the newest is enough, and each is as large as the model's trained part x 3
AT_ONCE = KEEP + 1  # checkpoints on disk while the next one is written


def checkpoint_bytes(trained_bytes: int) -> int:
    """A checkpoint's size: the trained parameters and AdamW's two moments (as large as the parameters)."""
    return 3 * trained_bytes

# Remedy named by every refusal; `mneme run` adds which folder to delete to a ForeignOutputError
# (pipeline.run._run_remedies).
START_OVER = "pass --no-resume (resume=False) to start over"


def input_digests(specs: Sequence[str]) -> dict[str, str]:
    """Digests of the local model folders (``files.stat_digest``: paths, sizes, times) and data files
    (``files.content_digest``) among ``specs``, and of a hub model in the local hub cache (its commit:
    ``activations.models.weights_digest``); other hub names and ``hf:`` specs have none."""
    from mneme_plugin.activations.models import weights_digest

    out = {}
    for spec in specs:
        path = Path(spec)
        if not spec or spec.startswith("hf:"):
            continue
        if path.is_dir():
            digest = stat_digest(path)
        elif path.is_file():
            digest = content_digest(path)
        else:
            digest = weights_digest(spec)
        if digest is not None:
            out[spec] = digest
    return out


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    import torch

    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def read_checkpoint_info(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the newest intervention checkpoint in ``folder`` records (kind, config, step, total_steps);
    None when it holds none."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None or not (checkpoint / CHECKPOINT_INFO).is_file():
        return None
    info = read_json(checkpoint / CHECKPOINT_INFO, f"delete {checkpoint} ({START_OVER})")
    return info if isinstance(info, dict) else None


class TrainingCheckpoints:
    """The checkpoints of one intervention run in ``folder`` (None: none written, none read).

    ``inputs``: the model folder and data specs the run reads (their digests pin the checkpoint).
    The trainer calls ``restore`` once its optimizer (and scheduler) exist, and ``save`` after each step.
    """

    def __init__(self, folder: str | os.PathLike[str] | None, config: ConfigMixin, inputs: Sequence[str],
                 every: int, *, resume: bool = True, label: str = "intervention") -> None:
        self.folder = None if folder is None else Path(folder)
        self.config, self.every, self.resume, self.label = config, every, resume, label
        self.identity: dict[str, Any] = {}
        if self.folder is not None:
            self.identity = {"kind": type(config).__name__, "config": config.result_dict(),
                             "inputs": input_digests(inputs)}

    def _comparable(self, identity: dict[str, Any]) -> dict[str, Any]:
        """``identity`` with its config read as the config class reads it now (fields added since take
        their default; a config that no longer reads is compared as written)."""
        out = dict(identity)
        if out.get("kind") == type(self.config).__name__ and isinstance(out.get("config"), dict):
            try:
                out["config"] = type(self.config).from_dict(out["config"]).result_dict()
            except ConfigError:
                pass
        return out

    def _check(self, checkpoint: Path) -> None:
        assert self.folder is not None
        stored = read_json(checkpoint / CHECKPOINT_INFO, f"delete {checkpoint} or {START_OVER}")
        if not isinstance(stored, dict):
            raise CheckpointError(f"{checkpoint / CHECKPOINT_INFO} is not an intervention checkpoint's record; "
                                  f"delete {checkpoint} or {START_OVER}.")
        previous = self._comparable({k: stored.get(k) for k in ("kind", "config", "inputs")})
        differences = config_differences(previous, self._comparable(self.identity))
        if differences:
            raise ForeignOutputError(
                f"{self.folder} holds checkpoints of an unfinished intervention with another config or other "
                f"inputs ({checkpoint / CHECKPOINT_INFO}: {'; '.join(differences[:5])}); to start over, delete "
                f"{self.folder / CHECKPOINT_DIR} or {START_OVER}; or choose another output folder.",
                self.folder,
            )

    def require_room(self, parameters: dict[str, torch.Tensor], total_steps: int, model_bytes: int) -> None:
        """Refuse to start (or resume) a run whose checkpoints (the trained parameters and AdamW's two moments,
        the newest kept while the next is written) and edited model (``model_bytes``, written while the last
        checkpoint is still there) do not fit the free space of the folder's disk, less what its checkpoints
        hold already: before, a full disk stopped the run at its first checkpoint or at the end."""
        assert self.folder is not None
        checkpoint = checkpoint_bytes(sum(p.numel() * p.element_size() for p in parameters.values()))
        written = (total_steps - 1) // self.every if self.every else 0
        need = max(AT_ONCE * checkpoint, KEEP * checkpoint + model_bytes) if written else model_bytes
        require_free_space(self.folder, need - tree_size(self.folder / CHECKPOINT_DIR),
                           f"The {self.label} run (checkpoints of {size_text(checkpoint)}, two at once while one is "
                           "written" + (f", then the edited model of {size_text(model_bytes)})" if model_bytes else ")"),
                           "free space there or choose an output folder on a larger disk (--out, or run_dir in "
                           "`mneme run`), or write fewer checkpoints (checkpoint_every: 0 writes none)")

    def restore(self, parameters: dict[str, torch.Tensor], optimizer: Any, scheduler: Any = None, *,
                total_steps: int, device: torch.device, model_bytes: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """Load the newest matching checkpoint into ``parameters`` (the trained ones, by name), the
        optimizer, the scheduler and the RNG: (steps done, training log so far); (0, []) without one.
        Without ``resume``, earlier checkpoints are removed instead. First, a run whose checkpoints and edited
        model (``model_bytes``) do not fit the disk is refused (``require_room``)."""
        import torch

        if self.folder is None:
            return 0, []
        if not self.resume:
            shutil.rmtree(self.folder / CHECKPOINT_DIR, ignore_errors=True)
        self.require_room(parameters, total_steps, model_bytes)
        if not self.resume:
            return 0, []
        checkpoint = latest_checkpoint(self.folder)
        if checkpoint is None:
            return 0, []
        self._check(checkpoint)
        remedy = f"delete {checkpoint} or {START_OVER}"
        # Memory-mapped: a full fine-tuning checkpoint (weights and optimizer) need not fit in RAM.
        state = load_state(checkpoint / STATE_FILE, remedy, map_location="cpu", mmap=True)
        saved = state.get("parameters") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or set(saved) != set(parameters):
            raise CheckpointError(f"{checkpoint / STATE_FILE} does not hold this run's trained parameters; {remedy}.")
        with torch.no_grad():
            for name, param in parameters.items():
                if saved[name].shape != param.shape:
                    raise CheckpointError(f"{checkpoint / STATE_FILE}: {name} has shape {tuple(saved[name].shape)}, "
                                          f"the model's {tuple(param.shape)}; {remedy}.")
                param.copy_(saved[name])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device)
        step = int(state["step"])
        logger.info("%s: resumed from %s at step %d of %d.", self.label, checkpoint, step, total_steps)
        return step, list(state["log"])

    def save(self, done: int, total_steps: int, parameters: dict[str, torch.Tensor], optimizer: Any,
             scheduler: Any, log: list[dict[str, Any]], device: torch.device) -> Path | None:
        """Write a checkpoint after ``done`` steps when it is due (every ``every`` steps, not after the last)."""
        import torch

        if self.folder is None or not self.every or done % self.every or done >= total_steps:
            return None
        folder = self.folder

        def write(tmp: Path) -> None:
            state = {"parameters": {name: p.detach() for name, p in parameters.items()},
                     "optimizer": optimizer.state_dict(),
                     "scheduler": None if scheduler is None else scheduler.state_dict(),
                     "step": done, "rng": rng_state(device), "log": list(log)}
            torch.save(state, tmp / STATE_FILE)
            info = {**self.identity, "step": done, "total_steps": total_steps}
            (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")

        path = write_checkpoint(folder, done, write, KEEP)
        logger.debug("%s: checkpoint %s.", self.label, path)
        return path


def _only_checkpoints(path: Path) -> bool:
    """A folder holding nothing but an intervention's checkpoints and lock (or nothing: a run killed
    before its first checkpoint leaves its lock file)."""
    return path.is_dir() and {p.name for p in path.iterdir()} <= {CHECKPOINT_DIR, LOCK_FILE}


def unfinished(out_dir: str | os.PathLike[str]) -> bool:
    """Whether ``out_dir`` holds an unfinished intervention: checkpoints, no model (the finished
    model is written over the folder, checkpoints and all)."""
    path = Path(out_dir)
    return _only_checkpoints(path) and (path / CHECKPOINT_DIR).is_dir()


def train_and_save(train: Callable[..., Any], config: Any, out_dir: str | os.PathLike[str], *,
                   overwrite: bool = False, resume: bool = True, progress: bool = True) -> Path:
    """Run the intervention ``train(config, ...)`` with its checkpoints in ``out_dir`` (resuming from
    them unless ``resume`` is False), then write the edited model folder over ``out_dir`` in one
    rename. A finished model folder there is replaced only with ``overwrite`` (refused before training; with it,
    the old model's files are removed before training, its checkpoints kept for the config check);
    ``out_dir`` is locked while training (OutputLockedError for a second job)."""
    from mneme_plugin.interventions.hf_models import save_intervention

    out_dir = Path(out_dir)
    config.check_ready()
    if out_dir.exists() and not overwrite and not _only_checkpoints(out_dir):
        raise ConfigError(f"{out_dir} already exists; choose another --out or pass --overwrite.")
    with output_lock(out_dir, "output folder (--out)"):
        if overwrite and not _only_checkpoints(out_dir):
            # The finished model goes now, not at the final rename: a kill before it would leave the old model
            # looking finished beside the new training's checkpoints (loaded, described and refused as such).
            for entry in out_dir.iterdir():
                if entry.name not in (CHECKPOINT_DIR, LOCK_FILE):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        result = train(config, progress=progress, out_dir=out_dir, resume=resume)
        return save_intervention(result, out_dir, overwrite=True)


__all__ = ["AT_ONCE", "CHECKPOINT_INFO", "TrainingCheckpoints", "checkpoint_bytes", "input_digests", "read_checkpoint_info", "train_and_save",
           "unfinished"]
