"""Interventions that edit a model.

* The CPU organism (TransformerLens): :func:`rmu_unlearn`, :func:`fine_tune`.
* Hugging Face causal LMs (Llama, Mistral, Qwen2, ...): :func:`rmu_unlearn_hf` (RMU),
  :func:`supervised_fine_tune` (full or LoRA SFT); :func:`save_intervention` writes the model folder.
"""

from mneme_plugin.interventions.finetune import FineTuneConfig, FineTuneResult, fine_tune
from mneme_plugin.interventions.hf_models import (
    INTERVENTION_CONFIG,
    TRAINING_LOG,
    InterventionResult,
    load_causal_lm,
    load_training_log,
    parameters_by_name,
    save_intervention,
)
from mneme_plugin.interventions.hf_rmu import HFRMUConfig, rmu_activation_distances, rmu_unlearn_hf
from mneme_plugin.interventions.rmu import RMUConfig, RMUResult, rmu_losses, rmu_unlearn
from mneme_plugin.interventions.sft import LoRASettings, SFTConfig, supervised_fine_tune

__all__ = [
    "FineTuneConfig", "FineTuneResult", "HFRMUConfig", "INTERVENTION_CONFIG", "InterventionResult", "LoRASettings",
    "RMUConfig", "RMUResult", "SFTConfig", "TRAINING_LOG", "fine_tune", "load_causal_lm", "load_training_log",
    "parameters_by_name", "rmu_activation_distances", "rmu_losses", "rmu_unlearn", "rmu_unlearn_hf",
    "save_intervention", "supervised_fine_tune",
]
