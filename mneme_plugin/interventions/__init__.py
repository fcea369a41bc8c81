"""Interventions that edit a model.

* The CPU organism (TransformerLens): :func:`rmu_unlearn`, :func:`fine_tune`, :func:`chat_fine_tune`.
* Hugging Face causal LMs (Llama, Mistral, Qwen2, ...): :func:`rmu_unlearn_hf` (RMU),
  :func:`supervised_fine_tune` (full or LoRA SFT); :func:`save_intervention` writes the model folder.
"""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.interventions.finetune": (
        "ChatFineTuneConfig", "FineTuneConfig", "FineTuneResult", "chat_fine_tune", "fine_tune",
    ),
    "mneme_plugin.interventions.rmu": ("RMUConfig", "RMUResult", "rmu_losses", "rmu_unlearn"),
    "mneme_plugin.interventions.hf_models": (
        "INTERVENTION_CONFIG", "TRAINING_LOG", "InterventionResult", "load_causal_lm", "load_training_log",
        "parameters_by_name", "save_intervention",
    ),
    "mneme_plugin.interventions.hf_rmu": ("HFRMUConfig", "rmu_activation_distances", "rmu_unlearn_hf"),
    "mneme_plugin.interventions.sft": ("LoRASettings", "SFTConfig", "supervised_fine_tune"),
})
