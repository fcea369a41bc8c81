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
| ``crosscoder_run/`` | ``mneme_plugin.crosscoder.training`` (checkpoints while it trains, final crosscoder, metrics) |
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
results (``prune_cache``, ``mneme clean RUN --cache``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from mneme_plugin.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.yaml"
STAGES_DIR = ".stages"
CACHE_DIR = "cache"
REPORT_FILE = "report.html"
CACHE_STAGES = ("ground_truth", "explain", "map")  # the stages that keep a cache/<stage>/
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

    def check_is_run(self) -> None:
        """CheckpointError unless the folder is a run directory (``looks_like_run``)."""
        if not self.root.is_dir() or not self.looks_like_run():
            # A folder one level above its run (a `mneme demo` case: recipe.yaml, run/) is the usual slip.
            inner = [child for child in sorted(self.root.iterdir()) if child.is_dir() and RunLayout(child).looks_like_run()] \
                if self.root.is_dir() else []
            hint = f" It holds {'a run directory' if len(inner) == 1 else 'run directories'}: " + \
                ", ".join(str(child) for child in inner) + "; give that." if inner else ""
            raise CheckpointError(
                f"{self.root} is not a MNEME run directory: it holds no {CONFIG_FILE}, no stage markers and no "
                "stage folder. Give the run_dir of a `mneme run` config (or a folder the stage commands wrote into)."
                + hint
            )

    def cache_entries(self) -> list[CacheEntry]:
        """What the stages keep in ``cache/``: each ``cache/<stage>/<entry>`` with its size, by stage and name."""
        entries = []
        cache = self.root / CACHE_DIR
        for stage in sorted(cache.iterdir()) if cache.is_dir() else []:
            if stage.is_dir() and not stage.is_symlink():
                entries += [CacheEntry(stage.name, path, *_files_and_bytes(path)) for path in sorted(stage.iterdir())]
        return entries


@dataclass(frozen=True)
class CacheEntry:
    """One entry of a run's cache: ``cache/<stage>/<name>`` (a folder such as ``llm_cache/``, or a file)."""

    stage: str
    path: Path
    files: int
    size: int  # bytes


def _files_and_bytes(path: Path) -> tuple[int, int]:
    """Files under ``path`` and their bytes; a symbolic link counts as itself, never what it points to."""
    if path.is_symlink() or not path.is_dir():
        return 1, path.lstat().st_size
    files = size = 0
    for folder, _, names in os.walk(path):  # does not follow links to folders
        for name in names:
            files += 1
            size += (Path(folder) / name).lstat().st_size
    return files, size


def prune_cache(run_dir: str | os.PathLike[str], stages: Collection[str] | None = None,
                dry_run: bool = False) -> list[CacheEntry]:
    """Delete what ``stages`` (default: every stage) keep in the run's ``cache/`` and return those
    entries; with ``dry_run`` only return them. Nothing outside ``cache/`` is touched: the stages'
    outputs stay, and a stage redone later computes (or asks its LLMs for) what it needs again.

    Refuses a folder that is not a run directory (CheckpointError), a stage that keeps no cache
    (ConfigError), and a run directory another mneme process is writing into (OutputLockedError)."""
    from mneme_plugin.files import output_lock

    layout = RunLayout(Path(run_dir))
    layout.check_is_run()
    unknown = sorted(set(stages or ()) - set(CACHE_STAGES))
    if unknown:
        raise ConfigError(f"No stage keeps a cache under the name(s) {unknown}: the stages with one are "
                          f"{', '.join(CACHE_STAGES)}.")
    chosen = [entry for entry in layout.cache_entries() if not stages or entry.stage in stages]
    if dry_run or not chosen:
        return chosen
    with output_lock(layout.root, "run directory"):  # not while a `mneme run` reads or writes it
        for entry in chosen:
            if entry.path.is_dir() and not entry.path.is_symlink():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
        emptied = sorted({entry.path.parent for entry in chosen}) + [layout.root / CACHE_DIR]
        for folder in emptied:  # the stages' folders, then cache/ itself
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return chosen
