"""``mneme run``: every stage from one config, skipping stages already done with the same config.

Each stage writes into its own folder of the run directory (``mneme_plugin.layout``) and, once
finished, a marker ``.stages/<stage>.json`` holding a fingerprint of the config sections it read
and of the stages before it. A stage whose marker matches is skipped; one whose config changed is
re-run from scratch; one that was interrupted (no marker) runs again and resumes where the stage
itself can (harvest and training continue from their last shard / checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mneme_plugin.layout import RunLayout
from mneme_plugin.io import atomic_write_text
from mneme_plugin.pipeline.config import RunConfig

logger = logging.getLogger("mneme_plugin")


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections the stage reads
    outputs: Callable[[RunLayout], Path]
    run: Callable[["PipelineContext"], None]
    enabled: Callable[[RunConfig], bool] = lambda config: True


@dataclass
class PipelineContext:
    config: RunConfig
    layout: RunLayout
    progress: bool = True
    models: dict[str, Any] = field(default_factory=dict)  # objects given by the caller, or loaded lazily

    def model(self, which: str) -> Any:
        if which not in self.models:
            from mneme_plugin.activations import load_model

            spec = getattr(self.config.models, which)
            h = self.config.harvest
            self.models[which] = load_model(resolve_model_spec(spec), device=h.device, dtype=h.model_dtype)
        return self.models[which]

    def corpus(self) -> Any:
        from mneme_plugin.activations.corpus import corpus_from_spec

        return corpus_from_spec(self.config.corpus.source)


def resolve_model_spec(spec: str) -> Any:
    """A model name / folder as is; ``organism:DIR/NAME`` as the saved organism model object."""
    if spec.startswith("organism:"):
        from mneme_plugin.organism import load_organism_model

        return load_organism_model(spec[len("organism:"):])
    return spec


def _fingerprint(config: RunConfig, stage: Stage, upstream: str) -> str:
    payload = {name: config.section_dict(name) for name in stage.sections if name in config.sections}
    text = json.dumps({"stage": stage.name, "config": payload, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker(layout: RunLayout, stage: Stage) -> Path:
    return layout.root / ".stages" / f"{stage.name}.json"


def _is_done(layout: RunLayout, stage: Stage, fingerprint: str) -> bool:
    marker = _marker(layout, stage)
    if not marker.is_file() or not stage.outputs(layout).exists():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except json.JSONDecodeError:
        return False


def _mark_done(layout: RunLayout, stage: Stage, fingerprint: str, seconds: float) -> None:
    info = {"stage": stage.name, "fingerprint": fingerprint, "seconds": round(seconds, 2)}
    atomic_write_text(_marker(layout, stage), json.dumps(info), durable=True)


def _stale_config(layout: RunLayout, stage: Stage, fingerprint: str) -> bool:
    """The stage finished before with another config: its outputs must be redone."""
    marker = _marker(layout, stage)
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") != fingerprint
    except json.JSONDecodeError:
        return True


def plan(config: RunConfig, stages: list[Stage]) -> list[tuple[Stage, str, str]]:
    """(stage, fingerprint, status) for every stage: status is run, skip (done) or disabled."""
    layout = RunLayout(Path(config.run_dir))
    out, upstream = [], ""
    for stage in stages:
        fingerprint = _fingerprint(config, stage, upstream)
        if not stage.enabled(config):
            out.append((stage, fingerprint, "disabled"))
            continue
        status = "skip (done)" if _is_done(layout, stage, fingerprint) else (
            "rerun (config changed)" if _stale_config(layout, stage, fingerprint) else "run")
        out.append((stage, fingerprint, status))
        upstream = fingerprint
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
    from mneme_plugin.pipeline.stages import STAGES

    stages = STAGES if stages is None else stages
    layout = RunLayout(Path(config.run_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    _write_config(config, layout)
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
        _mark_done(layout, stage, fingerprint, time.perf_counter() - start)
        logger.info("[%s] finished in %.1f s -> %s", stage.name, time.perf_counter() - start, stage.outputs(layout))
    return layout


def _write_config(config: RunConfig, layout: RunLayout) -> None:
    import yaml

    atomic_write_text(layout.config, yaml.safe_dump(config.to_dict(), sort_keys=False))
