"""The run directory of ``mneme run``: one folder per stage, so any stage can be re-run alone.

This module names every folder and top-level file of a run directory. The files *inside* a
stage's folder are named and read only by the module that owns the stage (see ARCHITECTURE.md):

| path | written by |
|---|---|
| ``config.yaml`` | ``mneme_plugin.pipeline.config`` (``save_run_config``) |
| ``edited_model/`` | ``mneme_plugin.interventions.step`` (the edited model, HF folder; while it trains, its checkpoints only) |
| ``ground_truth/`` | ``mneme_plugin.groundtruth.sources`` (``<name>.csv`` tables, measurements in ``<name>/``) |
| ``.stages/<stage>.json`` | ``mneme_plugin.pipeline.run`` (stage markers: config fingerprint, time) |
| ``.stages/<stage>.failed`` | ``mneme_plugin.pipeline.run`` (under torchrun: a failed stage other ranks waited for) |
| ``cache/<stage>/`` | the stage's module: what it keeps by content (explain / map: LLM answers; ground_truth: lm-eval results, judge answers and verdicts) |
| ``activations/`` | ``mneme_plugin.activations`` (store: manifest + shards) |
| ``crosscoder_run/`` | ``mneme_plugin.crosscoder.training`` (checkpoints, final crosscoder, metrics) |
| ``attribution/`` | ``mneme_plugin.attribution`` |
| ``contexts/`` | ``mneme_plugin.interpret.contexts`` (Delphi cache) |
| ``explanations/`` | ``mneme_plugin.interpret.explain`` |
| ``mapping/`` | ``mneme_plugin.interpret.mapping`` |
| ``prediction/`` | ``mneme_plugin.sideeffects.predict`` |
| ``evaluation/`` | ``mneme_plugin.sideeffects.evaluate`` |
| ``report.html`` | ``mneme_plugin.report`` |

Every path is relative to the run directory, so a run directory can be moved or renamed.

A stage that is redone (its config or a stage it reads changed) loses its folder; ``cache/`` is no
stage's output and stays: each entry in it is keyed by everything that decides its content, so a
redone stage takes from it only what it would compute again. Deleting ``cache/`` costs time, never
results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
STAGES_DIR = ".stages"
CACHE_DIR = "cache"
REPORT_FILE = "report.html"
STAGE_FOLDERS = ("edited_model", "ground_truth", "activations", "crosscoder_run", "attribution", "contexts", "explanations", "mapping",
                 "prediction", "evaluation")


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def edited_model(self) -> Path:
        return self.root / "edited_model"

    @property
    def ground_truth(self) -> Path:
        return self.root / "ground_truth"

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
        return self.root / REPORT_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def stages(self) -> Path:
        return self.root / STAGES_DIR

    def cache(self, stage: str) -> Path:
        """The folder where ``stage`` keeps what it computed by content (kept when the stage is redone)."""
        return self.root / CACHE_DIR / stage

    def stage_marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def stage_failure(self, stage: str) -> Path:
        """Under torchrun: rank 0's notice that a stage the other ranks wait for failed."""
        return self.stages / f"{stage}.failed"

    def stage_heartbeat(self, stage: str) -> Path:
        """Under torchrun: rewritten by rank 0 while it runs a stage the other ranks wait for (they
        stop when it no longer changes: rank 0 or its node has died)."""
        return self.stages / f"{stage}.alive"

    def looks_like_run(self) -> bool:
        """Whether the folder holds anything a run writes (its config, stage markers or a stage folder)."""
        return (self.config.is_file() or self.stages.is_dir()
                or any((self.root / name).is_dir() for name in STAGE_FOLDERS))
