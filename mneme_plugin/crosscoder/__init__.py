"""Crosscoders (a base class and a registry of architectures), the BatchTopK trainer and training loop."""

from mneme_plugin.crosscoder.base import CrossCoder, require_capability
from mneme_plugin.crosscoder.config import CrossCoderConfig, TrainingConfig
from mneme_plugin.crosscoder.imported import JumpReLUCrossCoder, ReLUCrossCoder
from mneme_plugin.crosscoder.model import BatchTopKCrossCoder, DecoupledBatchTopKCrossCoder
from mneme_plugin.crosscoder.registry import (
    CROSSCODER_CLASS_REGISTRY,
    build_crosscoder,
    get_crosscoder_class,
    register_crosscoder_class,
)
from mneme_plugin.crosscoder.salience import SALIENCE_MODES
from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer

register_crosscoder_class("batchtopk", BatchTopKCrossCoder)
register_crosscoder_class("batchtopk_decoupled", DecoupledBatchTopKCrossCoder)
register_crosscoder_class("relu", ReLUCrossCoder)
register_crosscoder_class("jumprelu", JumpReLUCrossCoder)

__all__ = [
    "CROSSCODER_CLASS_REGISTRY",
    "SALIENCE_MODES",
    "BatchTopKCrossCoder",
    "BatchTopKCrossCoderTrainer",
    "CrossCoder",
    "CrossCoderConfig",
    "DecoupledBatchTopKCrossCoder",
    "JumpReLUCrossCoder",
    "ReLUCrossCoder",
    "TrainingConfig",
    "build_crosscoder",
    "get_crosscoder_class",
    "register_crosscoder_class",
    "require_capability",
]
