"""Interventions that edit a model: RMU unlearning and supervised fine-tuning (narrow or benign)."""

from mneme_plugin.interventions.finetune import FineTuneConfig, FineTuneResult, fine_tune
from mneme_plugin.interventions.rmu import RMUConfig, RMUResult, rmu_losses, rmu_unlearn

__all__ = ["FineTuneConfig", "FineTuneResult", "RMUConfig", "RMUResult", "fine_tune", "rmu_losses", "rmu_unlearn"]
