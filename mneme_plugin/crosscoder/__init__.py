"""Crosscoders (a base class and a registry of architectures), the BatchTopK trainer and training loop."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.crosscoder.base": ("CrossCoder", "require_capability"),
    "mneme_plugin.crosscoder.config": ("CrossCoderConfig", "TrainingConfig"),
    "mneme_plugin.crosscoder.imported": ("JumpReLUCrossCoder", "ReLUCrossCoder"),
    "mneme_plugin.crosscoder.model": ("BatchTopKCrossCoder", "DecoupledBatchTopKCrossCoder"),
    "mneme_plugin.crosscoder.registry": ("CROSSCODER_CLASS_REGISTRY", "build_crosscoder", "get_crosscoder_class",
                                         "register_crosscoder_class"),
    "mneme_plugin.crosscoder.salience": ("SALIENCE_MODES",),
    "mneme_plugin.crosscoder.trainer": ("BatchTopKCrossCoderTrainer",),
})
