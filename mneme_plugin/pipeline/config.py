"""``RunConfig``: the whole pipeline in one YAML file, one section per stage's dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mneme_plugin.activations import HarvestConfig
from mneme_plugin.attribution import AttributionConfig
from mneme_plugin.config import ConfigMixin, read_yaml_mapping, require
from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
from mneme_plugin.errors import ConfigError
from mneme_plugin.interpret.config import CollectConfig, ExplainConfig, MapConfig
from mneme_plugin.sideeffects import EvaluateConfig, PredictConfig


@dataclass
class ModelsConfig(ConfigMixin):
    """The two models: HF names, local HF folders, or ``organism:DIR/NAME`` (a saved CPU organism model)."""

    base: str = ""
    edited: str = ""
    intervention: str = ""  # a plain-text description of the edit, for the naive baseline

    def __post_init__(self) -> None:
        require(bool(self.base) and bool(self.edited), "models.base and models.edited are both required.")


@dataclass
class CorpusConfig(ConfigMixin):
    """Task-agnostic text: a local .txt/.jsonl/.parquet file or ``hf:NAME[@CONFIG][:SPLIT]``."""

    source: str = ""

    def __post_init__(self) -> None:
        require(bool(self.source), "corpus.source is required (a local file or hf:NAME[@CONFIG][:SPLIT]).")


@dataclass
class GroundTruthConfig(ConfigMixin):
    """Per-category scores before / after the edit: a CSV (category, before, after[, n]) or two lm-eval results JSONs."""

    scores_csv: str | None = None
    lm_eval_before: str | None = None
    lm_eval_after: str | None = None

    def __post_init__(self) -> None:
        require(
            (self.lm_eval_before is None) == (self.lm_eval_after is None),
            "ground_truth.lm_eval_before and lm_eval_after go together.",
        )
        require(not (self.scores_csv and self.lm_eval_before), "Give ground_truth.scores_csv or the lm-eval pair, not both.")

    @property
    def available(self) -> bool:
        return bool(self.scores_csv or self.lm_eval_before)


SECTIONS: dict[str, type[ConfigMixin]] = {
    "models": ModelsConfig,
    "corpus": CorpusConfig,
    "harvest": HarvestConfig,
    "crosscoder": CrossCoderConfig,
    "training": TrainingConfig,
    "attribution": AttributionConfig,
    "collect": CollectConfig,
    "explain": ExplainConfig,
    "map": MapConfig,
    "predict": PredictConfig,
    "ground_truth": GroundTruthConfig,
    "evaluate": EvaluateConfig,
}
REQUIRED = ("models", "corpus", "harvest")


@dataclass
class RunConfig:
    """A whole MNEME run. ``run_dir`` holds every stage's outputs (see ``mneme_plugin.layout``)."""

    run_dir: str
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = dict(data)
        run_dir = data.pop("run_dir", None)
        if not run_dir:
            raise ConfigError("The run config needs run_dir: the directory for every stage's outputs.")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"Unknown section(s) {unknown} in the run config; known: run_dir, {', '.join(sorted(SECTIONS))}.")
        missing = [name for name in REQUIRED if name not in data]
        if missing:
            raise ConfigError(f"The run config lacks section(s) {missing}.")
        sections: dict[str, Any] = {}
        for name, klass in SECTIONS.items():
            raw = data.get(name)
            if raw is not None and not isinstance(raw, dict):
                raise ConfigError(f"Section {name!r} must be a mapping, got {type(raw).__name__}.")
            try:
                sections[name] = klass.from_dict(raw or {})
            except TypeError as err:  # a required field is missing
                raise ConfigError(f"Section {name!r}: {err}") from err
        return cls(run_dir=str(run_dir), sections=sections)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_yaml_mapping(path))

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, **{k: v.to_dict() for k, v in self.sections.items()}}

    def section_dict(self, name: str) -> dict[str, Any]:
        return self.sections[name].to_dict()

