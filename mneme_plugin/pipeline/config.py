"""``RunConfig``: the whole pipeline in one YAML file, one typed field per stage's config dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.attribution.config import AttributionConfig
from mneme_plugin.config import ConfigMixin, read_yaml_mapping, require
from mneme_plugin.crosscoder.config import CrossCoderConfig, TrainingConfig
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_write_text
from mneme_plugin.groundtruth.table import GroundTruthConfig
from mneme_plugin.interpret.config import CollectConfig, ExplainConfig, MapConfig
from mneme_plugin.layout import RunLayout
from mneme_plugin.sideeffects.config import EvaluateConfig, PredictConfig


@dataclass
class ModelsConfig(ConfigMixin):
    """The two models: HF names, local HF folders, or ``organism:PATH`` (a saved CPU organism model)."""

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
class RunConfig(ConfigMixin):
    """A whole MNEME run: ``run_dir`` holds every stage's outputs (``mneme_plugin.layout``); each
    other field is one stage's config and one section of the YAML file. ``models``, ``corpus`` and
    ``harvest`` are required; the others default to their dataclass's defaults."""

    run_dir: str
    models: ModelsConfig
    corpus: CorpusConfig
    harvest: HarvestConfig
    crosscoder: CrossCoderConfig = field(default_factory=CrossCoderConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    map: MapConfig = field(default_factory=MapConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    ground_truth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "The run config needs run_dir: the directory for every stage's outputs.")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, section: str | None = None) -> "RunConfig":
        data = dict(data or {})
        if not data.get("run_dir"):
            raise ConfigError("The run config needs run_dir: the directory for every stage's outputs.")
        if not isinstance(data["run_dir"], (str, os.PathLike)):
            raise ConfigError(f"run_dir must be a path, got {data['run_dir']!r}.")
        data["run_dir"] = str(data["run_dir"])
        sections = [f.name for f in dataclasses.fields(cls) if f.name != "run_dir"]
        unknown = sorted(set(data) - set(sections) - {"run_dir"}, key=str)
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(str(k), sections, n=1))
                                else "") for k in unknown]
            raise ConfigError(f"Unknown section(s) {', '.join(hints)} in the run config; known: run_dir, "
                              f"{', '.join(sections)}.")
        missing = [name for name in ("models", "corpus", "harvest") if name not in data]
        if missing:
            raise ConfigError(f"The run config lacks section(s) {', '.join(missing)}.")
        # An empty section (`training:` with nothing under it) means the defaults.
        return super().from_dict({k: ({} if v is None and k != "run_dir" else v) for k, v in data.items()},
                                 section=section)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.run_dir))

    def section_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "run_dir"]


def save_run_config(config: RunConfig, run_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``config.yaml`` into the run directory (atomically)."""
    layout = RunLayout(Path(run_dir)) if run_dir is not None else config.layout
    return atomic_write_text(layout.config, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_run_config(run_dir: str | os.PathLike[str]) -> RunConfig:
    """The config a run was started with (``config.yaml`` of its run directory).

    ``run_dir`` in the result is the directory it was read from, so a moved run directory
    still points at itself.
    """
    layout = RunLayout(Path(run_dir))
    if not layout.config.is_file():
        from mneme_plugin.errors import CheckpointError

        raise CheckpointError(f"{layout.config} does not exist: {run_dir} is not a `mneme run` directory.")
    data = read_yaml_mapping(layout.config)
    data["run_dir"] = str(layout.root)
    return RunConfig.from_dict(data)
