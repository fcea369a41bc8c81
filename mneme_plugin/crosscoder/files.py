"""The crosscoder package's file names, and what can be told from them without loading torch (``mneme info``
on a run directory, ``mneme clean --checkpoints``): a crosscoder folder holds CONFIG_FILE + WEIGHTS_FILE;
a training run (``training.py``) holds its final crosscoder in FINAL_DIR, METRICS_FILE, RUN_CONFIG_FILE and
``checkpoints/`` while it can be resumed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mneme_plugin.checkpoints import CHECKPOINT_DIR
from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import tree_size

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FINAL_DIR = "crosscoder"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "train_config.json"  # the config a training run's checkpoints and crosscoder were trained with


def training_finished(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the training run in ``run_dir`` has finished: its crosscoder and metrics are written (a resumed
    run then loads them)."""
    return (Path(run_dir) / FINAL_DIR).is_dir() and (Path(run_dir) / METRICS_FILE).is_file()


def remove_finished_checkpoints(run_dir: str | os.PathLike[str], dry_run: bool = False) -> int:
    """Delete the checkpoints of a finished training run (its crosscoder and metrics written) and return the
    bytes they held (0 when there are none; with ``dry_run`` delete nothing): what runs of earlier versions,
    or with ``keep_finished_checkpoints``, leave behind (`mneme clean --checkpoints`). An unfinished run's
    checkpoints are what resumes it: refused (CheckpointError)."""
    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return 0
    if not training_finished(run_dir):
        raise CheckpointError(f"The training run in {run_dir} has not finished (no {FINAL_DIR}/ and {METRICS_FILE}): "
                              "its checkpoints are what resumes it; train again to finish it, or delete the run.")
    size = tree_size(folder)
    if not dry_run:
        shutil.rmtree(folder)
    return size
