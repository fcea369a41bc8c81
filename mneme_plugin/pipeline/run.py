"""``mneme run``: every stage from one config, skipping stages already done with the same config.

Each stage writes into its own folder of the run directory (``mneme_plugin.layout``) and, once
finished, a marker ``.stages/<stage>.json`` holding a fingerprint of the config it read (only the
fields that change results: ``ConfigMixin.result_dict``) and of the stages before it. A stage whose
marker matches is skipped; one whose config changed is re-run from scratch; one that was
interrupted (no marker) runs again and resumes where the stage itself can (harvest and training
continue from their last shard / checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mneme_plugin.errors import CheckpointError, ConfigError, ForeignOutputError, RankFailedError
from mneme_plugin.files import atomic_write_text, fsync_dir, json_digest
from mneme_plugin.layout import RunLayout
from mneme_plugin.pipeline.config import RunConfig, save_run_config
from mneme_plugin.pipeline.stage import PipelineContext, Stage
from mneme_plugin.pipeline.stages import (
    STAGES, client_problems, corpus_digest, input_digests, model_digests, reads_corpus, validate_for_run,
)

if TYPE_CHECKING:  # torch: imported when a run starts, not with the package
    from mneme_plugin.distributed import DistributedContext

logger = logging.getLogger("mneme_plugin")


# Markers written before fingerprints left out the runtime fields carry no version (1); they are
# compared with the old fingerprint (every field), so such runs resume instead of starting over.
# Version 2 markers are compared with the sections fingerprinted before version 3 (``Stage.sections_before``:
# harvest read the whole models section; a streamed training and attribution not their batch sizes).
MARKER_VERSION = 3
FINGERPRINT_VERSIONS = (3, 2, 1)

# Under torchrun, rank 0 rewrites a stage's heartbeat file every HEARTBEAT_SECONDS while it runs a
# stage the other ranks wait for; a waiting rank that sees no new beat for HEARTBEAT_TIMEOUT seconds
# (by its own clock) stops with an error. On one node torchrun stops the others when a rank dies; on
# several nodes it does not stop the ranks of the other nodes, which would wait for the marker forever.
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_TIMEOUT = 600.0


@dataclass(frozen=True)
class StageMarker:
    """What ``.stages/<stage>.json`` records about a finished stage."""

    stage: str
    fingerprint: str
    seconds: float
    version: int = 1
    # Stages that read the corpus: the content digest of the local corpus file they read (the
    # fingerprint names the corpus by its source only); None when not recorded (older markers).
    corpus_digest: str | None = None
    # Digests of the model folders and ground-truth files the stage read (``stages.input_digests``);
    # None when not recorded (older markers).
    input_digests: dict[str, str] | None = None

    def recorded_digests(self) -> dict[str, str]:
        """Every input digest the marker holds, keyed as ``stages.input_digests`` keys them."""
        return {**({"corpus": self.corpus_digest} if self.corpus_digest is not None else {}),
                **(self.input_digests or {})}


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
        digest, inputs = info.get("corpus_digest"), info.get("input_digests")
        return StageMarker(str(info["stage"]), str(info["fingerprint"]), float(info.get("seconds", 0.0)),
                           int(info.get("version", 1)), str(digest) if digest is not None else None,
                           {str(k): str(v) for k, v in inputs.items()} if isinstance(inputs, dict) else None)
    except (OSError, ValueError, KeyError, TypeError) as err:
        # An unreadable marker is no proof the stage finished: it runs again, and the stages after it.
        logger.warning("Stage marker %s is unreadable (%s): that stage runs again.", path, type(err).__name__)
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


def _fingerprint(config: RunConfig, stage: Stage, upstream: str, *, version: int = MARKER_VERSION) -> str:
    """The stage's fingerprint as markers of ``version`` compute it (``upstream``: the same version's
    fingerprints of the stages it reads)."""
    legacy = version < 2
    payload = {name: _section_value(config, name, legacy) for name in stage.sections_of(config, version)}
    if stage.derived is not None:
        payload.update(stage.derived(config))
    blob: dict[str, Any] = {"stage": stage.name, "config": payload, "upstream": upstream}
    if stage.inputs is not None and not legacy:
        blob["inputs"] = stage.inputs(config)
    return json_digest(blob)


CORPUS_CHANGED = "rerun (corpus changed)"
INPUTS_CHANGED = "rerun (model or input files changed)"
UPSTREAM_REDONE = "rerun (input redone)"


def _status(layout: RunLayout, stage: Stage, fingerprints: dict[int, str],
            inputs: dict[str, str] | None = None) -> str:
    """``fingerprints``: the stage's fingerprint per marker version (``FINGERPRINT_VERSIONS``); ``inputs``: the
    digests of what the stage reads outside the run directory now (``stages.input_digests``)."""
    path = layout.stage_marker(stage.name)
    marker = _read_marker(path) if path.is_file() else None
    if marker is None:
        return "run"
    expected = fingerprints[min(max(marker.version, 1), MARKER_VERSION)]
    if marker.fingerprint != expected:
        return "rerun (config changed)"
    # An input the marker did not record (older markers), or that is gone now, is not second-guessed.
    recorded = marker.recorded_digests()
    changed = {key for key, digest in (inputs or {}).items() if recorded.get(key, digest) != digest}
    if changed:
        return CORPUS_CHANGED if "corpus" in changed else INPUTS_CHANGED
    return "skip (done)" if stage.outputs(layout).exists() else "run"


def _input_digests_now(config: RunConfig, stages: list[Stage]) -> dict[str, dict[str, str]]:
    """Per stage, the digests of the corpus, model folders and ground-truth files it reads, taken
    once per plan (the corpus file is digested once for all the stages that read it)."""
    corpus = corpus_digest(config) if any(reads_corpus(stage, config) for stage in stages) else None
    return {stage.name: input_digests(stage, config, corpus) for stage in stages if stage.present(config)}


def plan(config: RunConfig, stages: list[Stage],
         inputs: dict[str, dict[str, str]] | None = None) -> list[tuple[Stage, str, str]]:
    """(stage, fingerprint, status) for every stage: status is run, skip (done), rerun or disabled.
    ``inputs``: each stage's input digests when the caller has taken them already (``_input_digests_now``)."""
    layout = config.layout
    out: list[tuple[Stage, str, str]] = []
    upstream = {version: "" for version in FINGERPRINT_VERSIONS}
    done: dict[str, dict[int, str]] = {}  # enabled stage -> its fingerprint per marker version
    redone: set[str] = set()  # stages rerun because their inputs, or a stage they read, changed
    previous: tuple[str, ...] = ()
    inputs = inputs if inputs is not None else _input_digests_now(config, stages)
    for stage in stages:
        if not stage.present(config):
            continue
        if stage.after is not None:  # the fingerprints of the stages it reads (enabled ones), not the one before
            upstream = {version: "+".join(done[name][version] for name in stage.after if name in done)
                        for version in FINGERPRINT_VERSIONS}
            previous = stage.after
        fingerprints = {version: _fingerprint(config, stage, upstream[version], version=version)
                        for version in FINGERPRINT_VERSIONS}
        fingerprint = fingerprints[MARKER_VERSION]
        if not stage.enabled(config):
            out.append((stage, fingerprint, "disabled"))
            continue
        status = _status(layout, stage, fingerprints, inputs.get(stage.name))
        # Same config, but what it read is redone: its fingerprint cannot tell, so it is redone too; so is
        # an interrupted one, whose partial outputs (training checkpoints) were made from the old inputs.
        if redone & set(previous) and (status == "skip (done)"
                                       or (status == "run" and stage.outputs(layout).exists())):
            status = UPSTREAM_REDONE
        # A stage that runs again changes what the stages after it read: without a config change too (its
        # marker or outputs are gone, or it never ran although a later stage did, e.g. after `--only report`).
        if status == "run" or status.startswith("rerun"):
            redone.add(stage.name)
        out.append((stage, fingerprint, status))
        upstream, previous = fingerprints, (stage.name,)
        done[stage.name] = fingerprints
    return out


def check_only(only: list[str] | None, stages: list[Stage], config: RunConfig | None = None) -> None:
    """``--only``'s stage names must be stages; with ``config``, stages that this config runs (a stage absent
    or disabled here would run nothing, and the run would end as if it had done what was asked)."""
    unknown = sorted(set(only or ()) - {s.name for s in stages})
    if unknown:
        raise ConfigError(f"Unknown stage(s) {unknown}; the stages are {', '.join(s.name for s in stages)}.")
    if config is None:
        return
    off = [f"--only {stage.name}: the stage is {stage.off(config)}."
           for stage in stages if stage.name in (only or ()) and stage.off(config)]
    if off:
        raise ConfigError("The stages selected do not run with this config; nothing was run:\n  " + "\n  ".join(off)
                          + "\nDrop them from --only, or give the config what they need.")


def switched_off(config: RunConfig, stages: list[Stage]) -> list[Stage]:
    """The stages done under an earlier config (a marker) that this one leaves out (``present`` false) or
    disables (ground truth dropped: no evaluate; ``training.stream``: no harvest). What they wrote is no
    result of this config: a run removes it (``discard_stage``), as the report, `mneme info` and `mneme run`'s
    table would show it."""
    return [stage for stage in stages if stage.off(config) and config.layout.stage_marker(stage.name).is_file()]


def run_pipeline(
    config: RunConfig,
    stages: list[Stage] | None = None,
    *,
    models: dict[str, Any] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    check_disk: bool = True,
) -> RunLayout:
    """Run (or resume) every enabled stage of ``config``; ``models`` may pass model objects
    (``{"base": ..., "edited": ...}``) instead of the names in ``config.models``.

    Before the first stage, what the stages that will run write (downloads, the edited model, the store, the
    crosscoder's checkpoints and files) is summed per disk and a run that does not fit is refused
    (DiskSpaceError); ``check_disk=False`` starts anyway (each stage still checks its own writes).

    Under torchrun, the stages marked ``all_ranks`` (harvest, train) split their work over the
    ranks; rank 0 runs every other stage alone (the others wait for the stages before the last
    shared one and leave after it) and writes the run's own files (config, markers).
    """
    from mneme_plugin.distributed import distributed_context, job_world_size, main_rank_lock

    stages = STAGES if stages is None else stages
    check_only(only, stages, config)
    validate_for_run(config, stages, models=models)
    layout = config.layout
    # On every rank before the process group starts, from the config and markers alone (rank 0 plans again
    # with the inputs' digests): no rank waits for the others to learn it.
    early = plan(config, stages, inputs={})
    check_batch_shared(config, stages, only, job_world_size(), early)
    # The hosted LLM endpoints of the stages still to run, before the intervention: a missing key would
    # otherwise fail hours in, after the base model's answers.
    keys = client_problems(config, pending_outputs(config, early, only))
    if keys:
        raise ConfigError("An LLM client the run will call has no API key; nothing was run:\n  " + "\n  ".join(keys))
    dist = distributed_context(config.training.device)
    # One `mneme run` per run directory at a time: a second one fails at once (OutputLockedError);
    # under torchrun rank 0 holds the lock for the job.
    with main_rank_lock(dist, layout.root, "run directory (out_dir)"):
        _run_stages(config, stages, layout, dist, models=models, only=only, progress=progress, check_disk=check_disk)
    return layout


def check_batch_shared(config: RunConfig, stages: list[Stage], only: list[str] | None, world_size: int,
                       planned: list[tuple[Stage, str, str]] | None = None) -> None:
    """Refuse a ``training.batch_size`` that ``world_size`` ranks cannot split when the train stage will
    run: before the intervention and harvest, not hours later. ``planned``: rank 0's plan, or the plan from
    the config and markers alone (no input digests) that every rank makes before the process group starts
    (made here when not given; a done train stage whose inputs changed is then caught by rank 0's plan)."""
    if world_size == 1 or config.training.batch_size % world_size == 0:
        return
    planned = planned if planned is not None else plan(config, stages, inputs={})
    if any(stage.name == "train" and status != "disabled" and not status.startswith("skip")
           and (only is None or stage.name in only) for stage, _, status in planned):
        from mneme_plugin.crosscoder.distributed import check_divisible

        check_divisible(config.training.batch_size, world_size)


def unselected_inputs(planned: list[tuple[Stage, str, str]], only: list[str] | None) -> list[str]:
    """With ``only`` (`mneme run --only`): the selected stages that read a stage which is neither done nor
    selected (the edited model of an intervention not run yet; a store harvested with another config), each
    with what to add. Found before the first stage instead of when the stage reading it fails."""
    if only is None:
        return []
    status = {stage.name: st for stage, _, st in planned if st != "disabled"}
    problems, previous = [], ()
    for stage, _, st in planned:
        if st == "disabled":
            continue
        reads = stage.after if stage.after is not None else previous
        missing = [name for name in reads if name in status and name not in only and not status[name].startswith("skip")]
        if stage.name in only and missing:
            problems.append(f"--only {stage.name}: it reads what {' and '.join(missing)} write"
                            f"{'s' if len(missing) == 1 else ''}, which is not done ({', '.join(status[n] for n in missing)}) "
                            f"and not selected: add {' '.join('--only ' + n for n in missing)}, or run without --only.")
        previous = (stage.name,)
    return problems


def pending_outputs(config: RunConfig, planned: list[tuple[Stage, str, str]],
                    only: list[str] | None) -> dict[str, tuple[Path, int]]:
    """The stages ``planned`` will run (within ``only``): stage -> (its output folder, the bytes it holds now:
    an interrupted stage's partial work, or a redone stage's old outputs, removed before it runs)."""
    from mneme_plugin.files import tree_size

    return {stage.name: (stage.outputs(config.layout), tree_size(stage.outputs(config.layout)))
            for stage, _, status in planned
            if status != "disabled" and not status.startswith("skip") and (only is None or stage.name in only)}


def require_disk(config: RunConfig, planned: list[tuple[Stage, str, str]], only: list[str] | None,
                 models: dict[str, Any] | None = None) -> None:
    """Refuse (DiskSpaceError) a run whose stages still to run (``planned``, within ``only``) do not fit their
    disks together (``dry_run.disk_shortfalls``); a stage's output folder counts for what it holds already."""
    from mneme_plugin.errors import DiskSpaceError
    from mneme_plugin.pipeline.dry_run import disk_shortfalls

    shortfalls = disk_shortfalls(config, pending_outputs(config, planned, only), loaded=list(models or ()))
    if shortfalls:
        raise DiskSpaceError(" ".join(shortfalls) + " To start anyway (the sizes are estimates; each stage checks "
                             "its own writes again when it starts): `mneme run --no-disk-check` "
                             "(run_pipeline(..., check_disk=False)).")


def _run_stages(config: RunConfig, stages: list[Stage], layout: RunLayout, dist: DistributedContext, *,
                models: dict[str, Any] | None, only: list[str] | None, progress: bool, check_disk: bool = True) -> None:
    from mneme_plugin.distributed import local_only

    # rank 0: the plan every rank follows, the run's token, and the input digests the markers will record
    def start() -> tuple[list[tuple[str, str, str]], str, dict[str, dict[str, str]]]:
        inputs = _input_digests_now(config, stages)  # what the plan checked is what the markers record
        planned = plan(config, stages, inputs)
        check_batch_shared(config, stages, only, dist.world_size, planned)
        unmet = unselected_inputs(planned, only)
        if unmet:
            raise ConfigError("The stages selected cannot run; nothing was run:\n  " + "\n  ".join(unmet))
        if check_disk:  # before a redone stage's outputs go: a refused run leaves the run directory as it was
            require_disk(config, planned, only, models)
        # Before the new config is written: a run that stops early leaves no output of the old config
        # next to it, marked done, for later commands to read.
        stale = stale_outside_only(planned, only)
        if stale:
            logger.info("Not selected (--only), but their config changed or they read what this run redoes: %s; "
                        "their outputs go (`mneme run` without --only redoes them).",
                        ", ".join(stage.name for stage, _, _ in planned if stage.name in stale))
        discard_redone(planned, layout, only)
        for stage in switched_off(config, stages):
            logger.info("[%s] done under an earlier config; now %s: its outputs go.", stage.name, stage.off(config))
            discard_stage(stage, layout)
        save_run_config(config)
        steps = [(stage.name, fp, status) for stage, fp, status in planned]
        return steps, secrets.token_hex(8), inputs

    steps, token, inputs = dist.on_main(start)
    by_name = {stage.name: stage for stage in stages}
    todo = []
    for name, fingerprint, status in steps:
        if status == "disabled" or (only is not None and name not in only):
            continue
        if status.startswith("skip"):
            if dist.is_main:
                logger.info("[%s] done before with the same config: skipped (%s).", name,
                            by_name[name].outputs(layout))
            continue
        todo.append((by_name[name], fingerprint, status))
    last_shared = max((i for i, (stage, _, _) in enumerate(todo) if stage.all_ranks), default=-1)
    ctx = PipelineContext(config=config, layout=layout, progress=progress and dist.is_main,
                          models=dict(models or {}))
    for i, (stage, fingerprint, status) in enumerate(todo):
        if stage.all_ranks:  # every rank does its share (the stage's own function splits the work)
            dist.on_main(lambda: _start_stage(stage, status))
            start_time = time.perf_counter()
            with _run_remedies(stage):
                stage.run(ctx)
            dist.on_main(lambda: _finish_stage(stage, layout, fingerprint, token, start_time,
                                               _recorded_inputs(stage, config, inputs.get(stage.name))))
        elif not dist.is_main:
            if i > last_shared:
                logger.debug("Rank %d: no stage left for several ranks; rank 0 runs the rest.", dist.rank)
                return
            _wait_for_main(layout, stage, fingerprint, token)
        else:
            others_wait = dist.is_distributed and i < last_shared
            beating = _heartbeat(layout.stage_heartbeat(stage.name), token) if others_wait else contextlib.nullcontext()
            try:
                with local_only(), beating:  # rank 0 alone: its stages see one process
                    _start_stage(stage, status)
                    start_time = time.perf_counter()
                    with _run_remedies(stage):
                        stage.run(ctx)
                    _finish_stage(stage, layout, fingerprint, token, start_time,
                                  _recorded_inputs(stage, config, inputs.get(stage.name)))
            except BaseException as err:
                if others_wait:  # tell the ranks waiting for this stage, instead of leaving them waiting
                    atomic_write_text(layout.stage_failure(stage.name),
                                      json.dumps({"token": token, "error": f"{type(err).__name__}: {err}"}))
                raise


@contextlib.contextmanager
def _run_remedies(stage: Stage) -> Iterator[None]:
    """Add what to do in `mneme run` to a stage's ForeignOutputError (e.g. a partial store or training
    run left by a kill before the config changed) and CheckpointError (a damaged file), whose messages
    name the functions' remedies (``overwrite=True``, ``--no-resume``, "harvest it again"), which `mneme
    run` does not take."""
    try:
        yield
    except ForeignOutputError as err:
        raise ForeignOutputError(f"{err} In `mneme run`: delete {err.folder} to start the {stage.name} "
                                 "stage over, or give this run another run_dir.", err.folder) from err
    except CheckpointError as err:  # a damaged file: its remedy names a command `mneme run` does not take
        raise CheckpointError(f"{err} In `mneme run`: delete the run directory's folder of the stage that wrote "
                              "the damaged file (e.g. activations/ for a store's shard) and run again: the run redoes "
                              "that stage and the ones after it.") from err


def discard_redone(planned: list[tuple[Stage, str, str]], layout: RunLayout, only: list[str] | None = None) -> None:
    """Remove the outputs and markers of the stages ``plan`` redoes (``rerun ...``): those in ``only``, and
    those outside it that ``stale_outside_only`` names."""
    stale = stale_outside_only(planned, only)
    for stage, _, status in planned:
        if status.startswith("rerun") and (only is None or stage.name in only or stage.name in stale):
            discard_stage(stage, layout)


def stale_outside_only(planned: list[tuple[Stage, str, str]], only: list[str] | None) -> set[str]:
    """With ``only`` (`mneme run --only`): the stages outside it that ``plan`` would redo (``rerun ...``: their
    config changed, or a stage they read is redone), when a selected stage runs. The run then writes its new
    config.yaml and redoes what they read, so their markers would say done over outputs of the old config
    (for `mneme info` and the report), and a later run, finding outputs but no marker, would resume over them
    (a complete store of the old edited model). They go, marker and outputs, as in a run without ``--only``
    (``unselected_inputs`` has made sure that no selected stage reads them)."""
    if only is None or not any(stage.name in only and status != "disabled" and not status.startswith("skip")
                               for stage, _, status in planned):
        return set()
    return {stage.name for stage, _, status in planned if stage.name not in only and status.startswith("rerun")}


def discard_stage(stage: Stage, layout: RunLayout) -> None:
    """Remove a stage's marker, then its outputs. The marker goes first, and durably: a run killed while a
    large folder is deleted leaves a stage that is not done (it runs again), never half a folder marked done."""
    marker = layout.stage_marker(stage.name)
    if marker.is_file():
        marker.unlink()
        fsync_dir(layout.stages)
    target = stage.outputs(layout)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def unmark_written_stage(folder: str | os.PathLike[str], stage: str) -> list[str]:
    """A stage command wrote ``stage``'s outputs into ``folder`` (`mneme attribute --out RUN/attribution`, `mneme
    predict --run-dir RUN`): when ``folder`` is that stage's output folder (or inside it) in a `mneme run`
    directory, what the stage's marker and the markers of the stages after it say (done, with config.yaml's
    settings) no longer holds. Their markers are removed, so `mneme run` redoes them from config.yaml and
    `mneme info` lists them as not done; returns the stages removed, in order (none when ``folder`` is not
    that stage's folder of a run directory: explanations written beside the contexts change no stage)."""
    folder = Path(folder).resolve()
    names = [st.name for st in STAGES]
    if stage not in names:
        raise ValueError(f"Unknown stage {stage!r}; the stages are {names}.")
    for root in (folder.parent, folder.parent.parent):
        layout = RunLayout(root)
        if not layout.stages.is_dir():
            continue
        output = STAGES[names.index(stage)].outputs(layout).resolve()
        if output != folder and output not in folder.parents:
            return []
        removed = [name for name in names[names.index(stage):] if layout.stage_marker(name).is_file()]
        for name in removed:
            layout.stage_marker(name).unlink()
        return removed
    return []


def _start_stage(stage: Stage, status: str) -> None:
    if status.startswith("rerun"):
        # "rerun (config changed)" -> "config changed since it ran"; its old outputs went at the run's start.
        logger.info("[%s] %s since it ran: redoing it.", stage.name, status[len("rerun ("):].rstrip(")"))
    logger.info("[%s] running.", stage.name)


def _recorded_inputs(stage: Stage, config: RunConfig, planned: dict[str, str] | None) -> dict[str, str]:
    """What a finished stage's marker records: the digests the plan checked, and the commit of a hub
    model the stage downloaded (not in the hub cache when planned: ``stages.model_digests``), so the
    next plan sees a new commit of it."""
    return {**model_digests(stage, config), **(planned or {})}


def _finish_stage(stage: Stage, layout: RunLayout, fingerprint: str, token: str, start_time: float,
                  inputs: dict[str, str] | None = None) -> None:
    """``inputs``: the digests of what the stage read outside the run directory (the plan's)."""
    seconds = time.perf_counter() - start_time
    # ``token`` names this run of the pipeline: ranks waiting for the stage know the marker is new.
    info = {"stage": stage.name, "fingerprint": fingerprint, "seconds": round(seconds, 2),
            "version": MARKER_VERSION, "token": token}
    others = dict(inputs or {})
    if "corpus" in others:  # its own field, as markers have recorded it since corpus digests began
        info["corpus_digest"] = others.pop("corpus")
    if others:
        info["input_digests"] = others
    atomic_write_text(layout.stage_marker(stage.name), json.dumps(info), durable=True)
    layout.stage_failure(stage.name).unlink(missing_ok=True)
    logger.info("[%s] finished in %.1f s -> %s", stage.name, seconds, stage.outputs(layout))


@contextlib.contextmanager
def _heartbeat(path: Path, token: str) -> Iterator[None]:
    """Rank 0, while it runs a stage the other ranks wait for: ``path`` rewritten every
    ``HEARTBEAT_SECONDS`` with this run's token and a beat count (removed at the end)."""
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while True:
            count += 1
            try:
                atomic_write_text(path, json.dumps({"token": token, "beat": count}))
            except OSError:  # a full disk: the stage will say so itself
                pass
            if stop.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name="mneme-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def _wait_for_main(layout: RunLayout, stage: Stage, fingerprint: str, token: str, poll_seconds: float = 1.0) -> None:
    """A rank other than 0: wait (by reading files, no collective that could time out: stages such
    as an intervention run for hours) until rank 0 has finished ``stage`` in this run, or failed, or
    stopped beating (``HEARTBEAT_TIMEOUT`` without a new beat: its process or node is gone)."""
    marker, failed = layout.stage_marker(stage.name), layout.stage_failure(stage.name)
    alive = layout.stage_heartbeat(stage.name)
    last_beat, since = None, time.monotonic()
    while True:
        for path in (marker, failed):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if info.get("token") != token:
                continue
            if path == failed:
                raise RankFailedError(f"Rank 0 failed in stage {stage.name}: {info.get('error')}")
            if info.get("fingerprint") == fingerprint:
                return
        beat = _read_beat(alive, token)
        if beat is not None and beat != last_beat:
            last_beat, since = beat, time.monotonic()
        elif time.monotonic() - since > HEARTBEAT_TIMEOUT:
            raise RankFailedError(
                f"Rank 0 gave no sign of life for {HEARTBEAT_TIMEOUT:.0f} s while this rank waited for its stage "
                f"{stage.name} ({alive} did not change): rank 0's process or node has died. Its log says why; "
                "run the same command again to resume.")
        time.sleep(poll_seconds)


def _read_beat(path: Path, token: str) -> int | None:
    """The beat count of this run's heartbeat file, None when there is none (yet) or it is another run's."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info.get("beat") if isinstance(info, dict) and info.get("token") == token else None
