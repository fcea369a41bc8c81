"""Exceptions raised by mneme-plugin.

Every error says what was wrong and what to do about it. They share one base class so that
callers (and the CLI) can catch everything the package raises on bad input in one place.
"""

from __future__ import annotations

import os
from pathlib import Path


class MnemeError(Exception):
    """Base class of all errors raised by mneme-plugin on bad input or state."""


class ConfigError(MnemeError, ValueError):
    """A configuration value or key is invalid."""


class ModelMismatchError(MnemeError, ValueError):
    """The base and edited models cannot be compared (d_model, vocabulary, layer count)."""


class LayerOutOfRangeError(MnemeError, ValueError):
    """A requested layer or hook does not exist in the model."""


class NonFiniteActivationError(MnemeError, ValueError):
    """Activations contain NaN or inf."""


class EmptyCorpusError(MnemeError, ValueError):
    """The corpus yielded no usable tokens."""


class CheckpointError(MnemeError, ValueError):
    """A store, checkpoint or saved crosscoder is missing, corrupt or of a foreign format."""


class ForeignOutputError(ConfigError, CheckpointError):
    """An output folder holds other work: a partial (or complete) activation store harvested with
    another setup or corpus, files that are no store, a training run of another config or on other
    activations, or an unfinished intervention's checkpoints of another config. ``folder`` is that folder. The function's own remedy (another folder,
    ``overwrite=True`` / ``resume=False``) is in the message; ``mneme run`` adds its own.

    A ConfigError and a CheckpointError both, as harvest (CheckpointError) and training (ConfigError)
    raised before it existed."""

    def __init__(self, message: str, folder: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.folder = Path(folder)

    def __reduce__(self) -> tuple[type, tuple[str, Path]]:  # pickled between torchrun ranks
        return type(self), (str(self), self.folder)


class OutputLockedError(MnemeError, RuntimeError):
    """Another process is writing into the same output folder."""


class OutputExistsError(MnemeError, FileExistsError):
    """Writing would overwrite existing files and overwriting was not asked for."""


class DiskSpaceError(MnemeError, OSError):
    """What a job is about to write does not fit the free space of the disk it writes to."""


class RankFailedError(MnemeError, RuntimeError):
    """Another rank of a torchrun job failed at a step every rank waits on."""
