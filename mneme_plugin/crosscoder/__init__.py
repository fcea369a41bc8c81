"""The BatchTopK crosscoder, its trainer and training loop."""

from mneme_plugin.crosscoder.config import CrossCoderConfig, TrainingConfig
from mneme_plugin.crosscoder.model import BatchTopKCrossCoder
from mneme_plugin.crosscoder.salience import SALIENCE_MODES
from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer

__all__ = [
    "SALIENCE_MODES",
    "BatchTopKCrossCoder",
    "BatchTopKCrossCoderTrainer",
    "CrossCoderConfig",
    "TrainingConfig",
]
