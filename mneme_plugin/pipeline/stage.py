"""What a stage of ``mneme run`` is, and what it gets when it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mneme_plugin.layout import RunLayout
from mneme_plugin.pipeline.config import RunConfig


@dataclass
class Stage:
    """One stage of a run: the config sections it reads, its output in the run directory, its call."""

    name: str
    # The config sections the stage reads: a tuple, or a function of the config when that depends on it.
    sections: tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]]
    outputs: Callable[[RunLayout], Path]
    run: Callable[["PipelineContext"], None]
    enabled: Callable[[RunConfig], bool] = lambda config: True
    # Whether the run has the stage at all (stages of optional sections): absent ones are not planned or listed.
    present: Callable[[RunConfig], bool] = lambda config: True
    # The stages whose results this one reads; None: the stage before it (a chain, as most stages are).
    after: tuple[str, ...] | None = None
    # Under torchrun: every rank runs it (its function splits the work); otherwise rank 0 alone.
    all_ranks: bool = False
    # Digests of what the stage reads outside the run directory that its config only names (a
    # taxonomy's entries, a control run's attribution): part of its fingerprint, so a change reruns it.
    inputs: Callable[[RunConfig], dict[str, str]] | None = None
    # The sections that fingerprints of markers written before version 3 (``run.MARKER_VERSION``) read, where
    # they differ (harvest then read the whole ``models`` section, its naive baseline's description included;
    # a streamed training neither forward-batch size): such markers still count. None: ``sections``.
    sections_before: tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]] | None = None
    # Values drawn from several sections that decide the stage's results (predict's taxonomies), in every
    # fingerprint; {} where the value is what fingerprints without it implied, so those do not change.
    derived: Callable[[RunConfig], dict[str, Any]] | None = None
    # Why the stage is absent (``present`` false) or disabled (``enabled`` false) when it is: for `--only`'s
    # refusal of it, and the log line of a run that removes what it did under an earlier config.
    off_reason: str = ""

    def off(self, config: RunConfig) -> str | None:
        """Why the stage does not run under ``config`` ("not in this run" or "disabled", with ``off_reason``);
        None when it runs."""
        if self.present(config) and self.enabled(config):
            return None
        return ("not in this run" if not self.present(config) else "disabled") + (
            f" ({self.off_reason})" if self.off_reason else "")

    def sections_of(self, config: RunConfig, version: int | None = None) -> tuple[str, ...]:
        """The sections the stage reads; with ``version``, those that a marker of that version fingerprinted."""
        sections = self.sections if version is None or version >= 3 or self.sections_before is None \
            else self.sections_before
        return sections(config) if callable(sections) else sections


@dataclass
class PipelineContext:
    """What a stage gets: the run's config and layout, and the models (given objects or loaded once)."""

    config: RunConfig
    layout: RunLayout
    progress: bool = True
    models: dict[str, Any] = field(default_factory=dict)

    def model(self, which: str) -> Any:
        if which not in self.models:
            from mneme_plugin.activations.models import load_model

            h = self.config.harvest
            self.models[which] = load_model(self.config.model_spec(which), device=h.device, dtype=h.model_dtype, role=which)
        return self.models[which]

    def corpus(self) -> Any:
        from mneme_plugin.activations.corpus import corpus_from_spec

        return corpus_from_spec(self.config.corpus.source)
