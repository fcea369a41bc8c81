"""Interventions that edit a model: RMU unlearning and supervised fine-tuning (narrow or benign)."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.interventions.finetune": ("FineTuneConfig", "FineTuneResult", "fine_tune"),
    "mneme_plugin.interventions.rmu": ("RMUConfig", "RMUResult", "rmu_losses", "rmu_unlearn"),
})
