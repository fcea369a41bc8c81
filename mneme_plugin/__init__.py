"""mneme-plugin: predict what else changed when an LLM was fine-tuned or unlearned (MNEME).

Compare the base and the edited model with a sparse crosscoder on task-agnostic text, find the
latents the edit amplified or suppressed, and explain them. Public names are imported on first
use (``mneme_plugin._lazy``), so importing the package is cheap.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mneme_plugin._lazy import lazy_exports

try:
    __version__ = version("mneme-plugin")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__getattr__, __dir__, _exports = lazy_exports(__name__, {
    "mneme_plugin.activations": (
        "ActivationStore", "HarvestConfig", "HarvestStream", "HFDataset", "harvest", "harvest_stream", "load_model",
    ),
    "mneme_plugin.attribution": ("AttributionConfig", "AttributionResult", "attribute", "load_attribution"),
    "mneme_plugin.crosscoder": ("BatchTopKCrossCoder", "BatchTopKCrossCoderTrainer", "CrossCoderConfig",
                                "TrainingConfig"),
    "mneme_plugin.crosscoder.metrics": ("CrossCoderMetrics", "evaluate_crosscoder"),
    "mneme_plugin.crosscoder.training": ("TrainResult", "train"),
    "mneme_plugin.formats": ("export_saelens", "import_crosscoder", "load_crosscoder"),
    "mneme_plugin.pipeline": ("RunConfig", "run_pipeline"),
    "mneme_plugin.errors": (
        "CheckpointError", "ConfigError", "EmptyCorpusError", "LayerOutOfRangeError", "MnemeError",
        "ModelMismatchError", "NonFiniteActivationError",
    ),
})
__all__ = ["__version__", *_exports]
