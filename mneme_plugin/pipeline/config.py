"""``RunConfig``: the whole pipeline in one YAML file, one typed field per stage's config dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
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
from mneme_plugin.groundtruth.sources import RunGroundTruthConfig
from mneme_plugin.interpret.config import CollectConfig, ExplainConfig, MapConfig, check_windows
from mneme_plugin.interventions.step import EDITED_BY_RUN, InterventionConfig
from mneme_plugin.layout import RunLayout
from mneme_plugin.sideeffects.config import EvaluateConfig, PredictConfig


@dataclass
class ModelsConfig(ConfigMixin):
    """The two models: HF names, local HF folders, or ``organism:PATH`` (a saved CPU organism model).
    ``edited: intervention`` means the model the run's ``intervention`` stage writes (``edited_model/``)."""

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


# Sections whose stage runs only when the section is given (null or absent: no such stage).
OPTIONAL_SECTIONS = ("intervention",)


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
    ground_truth: RunGroundTruthConfig = field(default_factory=RunGroundTruthConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    intervention: InterventionConfig | None = None

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "The run config needs run_dir: the directory for every stage's outputs.")
        require(self.intervention is None or self.models.edited == EDITED_BY_RUN,
                f"The run has an intervention section: set models.edited to {EDITED_BY_RUN!r} (its edited model).")
        require(self.intervention is not None or self.models.edited != EDITED_BY_RUN,
                f"models.edited is {EDITED_BY_RUN!r} but the run has no intervention section.")
        require(self.crosscoder.training_problem() is None, str(self.crosscoder.training_problem()))
        if self.collect.harvest is None:  # collect reads the run's windows (checked here, not at the collect stage)
            check_windows(self.harvest.context_length, self.collect.example_ctx_len)
        missing = [t for t in self.taxonomies() if t not in self.map.taxonomies]
        require(not missing, f"ground_truth.tables use taxonomies {missing} that map.taxonomies lacks: add them there "
                "so latents are mapped to their categories.")

    def model_spec(self, which: str) -> str:
        """The spec of model ``which`` (base / edited) to load: ``edited: intervention`` is the run's edited_model/."""
        spec = getattr(self.models, which)
        return str(self.layout.edited_model) if which == "edited" and spec == EDITED_BY_RUN else spec

    def taxonomies(self) -> list[str]:
        """Every taxonomy the run predicts for: the map section's first, then those of the ground-truth tables."""
        names = [self.map.taxonomies[0]] + [t.taxonomy for t in self.ground_truth.tables.values() if t.taxonomy]
        return list(dict.fromkeys(names))

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
                                else _owning_sections(cls, str(k))) for k in unknown]
            raise ConfigError(f"Unknown section(s) {', '.join(hints)} in the run config; known: run_dir, "
                              f"{', '.join(sections)}.")
        missing = [name for name in ("models", "corpus", "harvest") if name not in data]
        if missing:
            raise ConfigError(f"The run config lacks section(s) {', '.join(missing)}.")
        # An empty section (`training:` with nothing under it) means the defaults; an optional one, none.
        return super().from_dict({k: ({} if v is None and k not in ("run_dir", *OPTIONAL_SECTIONS) else v)
                                  for k, v in data.items()}, section=section)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.run_dir))

    def section_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name != "run_dir"]


def _owning_sections(cls: type, key: str) -> str:
    """`` (a key of harvest: indent it under harvest:)`` for a section's key written at the top level (a
    YAML indentation slip), else ""."""
    owners = []
    for name, hint in typing.get_type_hints(cls).items():
        section = next((t for t in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(t)), None)
        if section is not None and key in {f.name for f in dataclasses.fields(section)}:
            owners.append(name)
    if not owners:
        return ""
    where = f"indent it under {owners[0]}:" if len(owners) == 1 else "indent it under the section it belongs to"
    return f" (a key of {' / '.join(owners)}: {where})"


def save_run_config(config: RunConfig, run_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``config.yaml`` into the run directory (atomically), a literal API key as ``REDACTED_KEY``
    (``interpret.clients.redacted_keys``): the run directory is shared, and nothing reads a key from it
    (`mneme run` reads the user's config each time; a fingerprint holds a key only redacted)."""
    from mneme_plugin.interpret.clients import redacted_keys

    layout = RunLayout(Path(run_dir)) if run_dir is not None else config.layout
    return atomic_write_text(layout.config, yaml.safe_dump(redacted_keys(config.to_dict()), sort_keys=False))


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
