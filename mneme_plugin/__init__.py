"""mneme-plugin: predict what else changed when an LLM was fine-tuned or unlearned (MNEME).

Compare the base and the edited model with a sparse crosscoder on task-agnostic text, find the
latents the edit amplified or suppressed, and explain them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mneme_plugin.activations import (
    ActivationStore,
    HarvestConfig,
    HarvestStream,
    HFDataset,
    harvest,
    harvest_stream,
    load_model,
)
from mneme_plugin.attribution import AttributionConfig, AttributionResult, attribute, load_attribution
from mneme_plugin.crosscoder import (
    BatchTopKCrossCoder,
    BatchTopKCrossCoderTrainer,
    CrossCoder,
    CrossCoderConfig,
    TrainingConfig,
)
from mneme_plugin.crosscoder.metrics import CrossCoderMetrics, evaluate_crosscoder
from mneme_plugin.crosscoder.training import TrainResult, train
from mneme_plugin.formats import export_saelens, import_crosscoder, load_crosscoder, register_format
from mneme_plugin.errors import (
    CheckpointError,
    ConfigError,
    EmptyCorpusError,
    LayerOutOfRangeError,
    MnemeError,
    ModelMismatchError,
    NonFiniteActivationError,
)

try:
    __version__ = version("mneme-plugin")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "ActivationStore",
    "AttributionConfig",
    "AttributionResult",
    "BatchTopKCrossCoder",
    "BatchTopKCrossCoderTrainer",
    "CheckpointError",
    "ConfigError",
    "CrossCoder",
    "CrossCoderConfig",
    "CrossCoderMetrics",
    "EmptyCorpusError",
    "HFDataset",
    "HarvestConfig",
    "HarvestStream",
    "LayerOutOfRangeError",
    "MnemeError",
    "ModelMismatchError",
    "NonFiniteActivationError",
    "TrainResult",
    "TrainingConfig",
    "__version__",
    "attribute",
    "evaluate_crosscoder",
    "export_saelens",
    "harvest",
    "harvest_stream",
    "import_crosscoder",
    "load_attribution",
    "load_crosscoder",
    "load_model",
    "register_format",
    "train",
]
