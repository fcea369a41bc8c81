"""The BatchTopK crosscoder, its trainer and training loop."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.crosscoder.config": ("CrossCoderConfig", "TrainingConfig"),
    "mneme_plugin.crosscoder.model": ("BatchTopKCrossCoder",),
    "mneme_plugin.crosscoder.salience": ("SALIENCE_MODES",),
    "mneme_plugin.crosscoder.trainer": ("BatchTopKCrossCoderTrainer",),
})
