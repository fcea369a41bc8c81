"""``mneme run``: every stage from one config, skipping stages already done with the same config.

Each stage writes into its own folder of the run directory (``mneme_plugin.layout``) and, once
finished, a marker ``.stages/<stage>.json`` holding a fingerprint of the config it read (only the
fields that change results: ``ConfigMixin.result_dict``) and of the stages before it. A stage whose
marker matches is skipped; one whose config changed is re-run from scratch; one that was
interrupted (no marker) runs again and resumes where the stage itself can (harvest and training
continue from their last shard / checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_write_text, output_lock
from mneme_plugin.layout import RunLayout
from mneme_plugin.pipeline.config import RunConfig, save_run_config
from mneme_plugin.pipeline.stage import PipelineContext, Stage
from mneme_plugin.pipeline.stages import STAGES, validate_for_run

logger = logging.getLogger("mneme_plugin")


# Markers written before fingerprints left out the runtime fields carry no version; they are
# compared with the old fingerprint (every field), so such runs resume instead of starting over.
MARKER_VERSION = 2


@dataclass(frozen=True)
class StageMarker:
    """What ``.stages/<stage>.json`` records about a finished stage."""

    stage: str
    fingerprint: str
    seconds: float
    version: int = 1


def read_stage_markers(run_dir: str | os.PathLike[str]) -> list[StageMarker]:
    """The finished stages of a run directory, in the order they finished."""
    layout = RunLayout(Path(run_dir))
    markers = []
    for path in sorted(layout.stages.glob("*.json"), key=lambda p: p.stat().st_mtime):
        marker = _read_marker(path)
        if marker is not None:
            markers.append(marker)
    return markers


def _read_marker(path: Path) -> StageMarker | None:
    try:
        info = json.loads(path.read_text())
        return StageMarker(str(info["stage"]), str(info["fingerprint"]), float(info.get("seconds", 0.0)),
                           int(info.get("version", 1)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _section_value(config: RunConfig, name: str, legacy: bool) -> Any:
    """A section's fingerprinted value; ``models.base`` names one field of a section."""
    from mneme_plugin.config import ConfigMixin

    value: Any = config
    for part in name.split("."):
        value = getattr(value, part)
    if isinstance(value, ConfigMixin):
        return value.to_dict() if legacy else value.result_dict()
    return value


def _fingerprint(config: RunConfig, stage: Stage, upstream: str, *, legacy: bool = False) -> str:
    payload = {name: _section_value(config, name, legacy) for name in stage.sections_of(config)}
    text = json.dumps({"stage": stage.name, "config": payload, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _status(layout: RunLayout, stage: Stage, fingerprint: str, legacy_fingerprint: str) -> str:
    path = layout.stage_marker(stage.name)
    marker = _read_marker(path) if path.is_file() else None
    if marker is None:
        return "run"
    expected = fingerprint if marker.version >= MARKER_VERSION else legacy_fingerprint
    if marker.fingerprint != expected:
        return "rerun (config changed)"
    return "skip (done)" if stage.outputs(layout).exists() else "run"


def plan(config: RunConfig, stages: list[Stage]) -> list[tuple[Stage, str, str]]:
    """(stage, fingerprint, status) for every stage: status is run, skip (done), rerun or disabled."""
    layout = config.layout
    out, upstream, legacy_upstream = [], "", ""
    done: dict[str, tuple[str, str]] = {}  # enabled stage -> (fingerprint, legacy fingerprint)
    for stage in stages:
        if not stage.present(config):
            continue
        if stage.after is not None:  # the fingerprints of the stages it reads (enabled ones), not the one before
            upstream = "+".join(done[name][0] for name in stage.after if name in done)
            legacy_upstream = "+".join(done[name][1] for name in stage.after if name in done)
        fingerprint = _fingerprint(config, stage, upstream)
        legacy = _fingerprint(config, stage, legacy_upstream, legacy=True)
        if not stage.enabled(config):
            out.append((stage, fingerprint, "disabled"))
            continue
        out.append((stage, fingerprint, _status(layout, stage, fingerprint, legacy)))
        upstream, legacy_upstream = fingerprint, legacy
        done[stage.name] = (fingerprint, legacy)
    return out


def run_pipeline(
    config: RunConfig,
    stages: list[Stage] | None = None,
    *,
    models: dict[str, Any] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
) -> RunLayout:
    """Run (or resume) every enabled stage of ``config``; ``models`` may pass model objects
    (``{"base": ..., "edited": ...}``) instead of the names in ``config.models``."""
    stages = STAGES if stages is None else stages
    if only is not None:
        unknown = sorted(set(only) - {s.name for s in stages})
        if unknown:
            raise ConfigError(f"Unknown stage(s) {unknown}; the stages are {', '.join(s.name for s in stages)}.")
    validate_for_run(config, stages, models=models)
    layout = config.layout
    # One `mneme run` per run directory at a time: a second one fails at once (OutputLockedError).
    with output_lock(layout.root, "run directory (out_dir)"):
        _run_stages(config, stages, layout, models=models, only=only, progress=progress)
    return layout


def _run_stages(config: RunConfig, stages: list[Stage], layout: RunLayout, *, models: dict[str, Any] | None,
                only: list[str] | None, progress: bool) -> None:
    save_run_config(config)
    ctx = PipelineContext(config=config, layout=layout, progress=progress, models=dict(models or {}))
    for stage, fingerprint, status in plan(config, stages):
        if status == "disabled" or (only is not None and stage.name not in only):
            continue
        if status.startswith("skip"):
            logger.info("[%s] done before with the same config: skipped (%s).", stage.name, stage.outputs(layout))
            continue
        if status.startswith("rerun"):
            logger.info("[%s] config changed since it ran: redoing it.", stage.name)
            target = stage.outputs(layout)
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        logger.info("[%s] running.", stage.name)
        start = time.perf_counter()
        stage.run(ctx)
        seconds = time.perf_counter() - start
        info = {"stage": stage.name, "fingerprint": fingerprint, "seconds": round(seconds, 2),
                "version": MARKER_VERSION}
        atomic_write_text(layout.stage_marker(stage.name), json.dumps(info), durable=True)
        logger.info("[%s] finished in %.1f s -> %s", stage.name, seconds, stage.outputs(layout))
