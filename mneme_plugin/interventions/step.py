"""The ``intervention`` stage of ``mneme run``: edit the run's base model and save the edited model
in the run directory (``edited_model/``), so that ``models.edited: intervention`` names it.

Kinds (``INTERVENTION_KINDS``): ``rmu`` (:class:`~mneme_plugin.interventions.hf_rmu.HFRMUConfig`)
and ``sft`` (:class:`~mneme_plugin.interventions.sft.SFTConfig`). ``preset`` names a shipped preset
(``mneme intervene presets``) whose keys ``settings`` override. The edited model is always the
run's ``models.base``: a ``model`` key in the preset is replaced by it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mneme_plugin.config import ConfigMixin, require
from mneme_plugin.errors import ConfigError

# kind -> (module, config class, function); imported on use (they import torch).
INTERVENTION_KINDS: dict[str, tuple[str, str, str]] = {
    "rmu": ("mneme_plugin.interventions.hf_rmu", "HFRMUConfig", "rmu_unlearn_hf"),
    "sft": ("mneme_plugin.interventions.sft", "SFTConfig", "supervised_fine_tune"),
}
# The value of ``models.edited`` that means "the model this run's intervention stage writes".
EDITED_BY_RUN = "intervention"


def _kind(kind: str) -> tuple[type, Any]:
    module, cls, fn = INTERVENTION_KINDS[kind]
    loaded = importlib.import_module(module)
    return getattr(loaded, cls), getattr(loaded, fn)


@dataclass
class InterventionConfig(ConfigMixin):
    """The edit a run makes: ``kind`` (rmu | sft), an optional shipped ``preset`` and ``settings``
    (the kind's config keys, overriding the preset's)."""

    kind: str = ""
    preset: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.kind in INTERVENTION_KINDS,
                f"intervention.kind must be one of {sorted(INTERVENTION_KINDS)}, got {self.kind!r}.")
        require("model" not in self.settings, "intervention.settings.model: the intervention edits models.base; "
                "leave `model` out.")
        self.resolved("")  # check the keys and values now, not when the stage starts

    def resolved(self, model: str) -> Any:
        """The kind's config for ``model``: preset, then settings."""
        from mneme_plugin.presets import merged_config

        cls, _ = _kind(self.kind)
        data = merged_config(self.preset, dict(self.settings), self.kind)
        data["model"] = model
        return cls.from_dict(data, section="intervention.settings")

    def result_dict(self) -> dict[str, Any]:
        # What decides the edited model: the preset's values included (a changed preset redoes the edit).
        return {"kind": self.kind, "config": self.resolved("").result_dict()}


def run_intervention(config: InterventionConfig, base_model: str, out_dir: str | Path, progress: bool = True) -> Path:
    """Edit ``base_model`` as ``config`` says and save the edited model folder to ``out_dir``; an
    interrupted edit resumes from its checkpoints there (``interventions.checkpoints``)."""
    from mneme_plugin.interventions.checkpoints import train_and_save

    if base_model.startswith("organism:"):
        raise ConfigError("The intervention stage edits Hugging Face causal LMs; models.base is an organism model.")
    settings = config.resolved(base_model)
    settings.check_ready()
    _, function = _kind(config.kind)
    return train_and_save(function, settings, out_dir, overwrite=True, progress=progress)
