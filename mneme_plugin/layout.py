"""Where each stage of a run writes its outputs inside the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The run directory of ``mneme run``: one sub-directory per stage, so any stage can be re-run alone."""

    root: Path

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def crosscoder_run(self) -> Path:
        return self.root / "crosscoder_run"

    @property
    def attribution(self) -> Path:
        return self.root / "attribution"

    @property
    def contexts(self) -> Path:
        return self.root / "contexts"

    @property
    def explanations(self) -> Path:
        return self.root / "explanations"

    @property
    def mapping(self) -> Path:
        return self.root / "mapping"

    @property
    def prediction(self) -> Path:
        return self.root / "prediction"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"
