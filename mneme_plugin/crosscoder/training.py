"""The training loop around ``BatchTopKCrossCoderTrainer``: data, checkpoints, resume, metrics.

Run directory layout::

    run_dir/
      train_config.json        crosscoder + training configs this run was started with (+ the store's digest)
      checkpoints/step_XXXXXXXX/   config.json, model.safetensors (the weights), trainer_state.pt (Adam, schedule, counters; atomic, newest kept)
      crosscoder/              the final crosscoder (config.json + model.safetensors)
      metrics.json             quality figures of the final crosscoder
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.activations.store import ActivationStore
from mneme_plugin.crosscoder.config import CrossCoderConfig, TrainingConfig
from mneme_plugin.crosscoder.files import (  # noqa: F401  (re-exported: where they were defined before)
    FINAL_DIR, METRICS_FILE, RUN_CONFIG_FILE, remove_finished_checkpoints, training_finished,
)
from mneme_plugin.crosscoder.distributed import DistributedBatchTopKCrossCoderTrainer, check_divisible, rank_slices
from mneme_plugin.crosscoder.metrics import (
    EVAL_HELD_OUT,
    EVAL_STREAM,
    EVAL_TRAINING_BATCH,
    CrossCoderMetrics,
    evaluate_crosscoder,
)
from mneme_plugin.crosscoder.model import BatchTopKCrossCoder
from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer
from mneme_plugin.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    distributed_context,
    job_world_size,
    main_rank_lock,
)
from mneme_plugin import checkpoints
from mneme_plugin.checkpoints import CHECKPOINT_DIR, STATE_FILE
from mneme_plugin.errors import CheckpointError, ConfigError, ForeignOutputError, NonFiniteActivationError
from mneme_plugin.files import (
    atomic_directory, atomic_write_text, json_digest, read_json, require_free_space, size_text, tree_size,
)

logger = logging.getLogger("mneme_plugin")

TrainingData = Union[str, os.PathLike, ActivationStore, Iterable[torch.Tensor]]
StepCallback = Callable[[int, BatchTopKCrossCoderTrainer], None]


@dataclass
class TrainResult:
    crosscoder: BatchTopKCrossCoder
    metrics: CrossCoderMetrics
    run_dir: Path

    @property
    def crosscoder_dir(self) -> Path:
        return self.run_dir / FINAL_DIR


class _Data:
    """Uniform view of a store or a stream: training batches from a given step, held-out rows, scale factors.

    With a store, the last rows of every shard (in proportion to its size; whole contexts, as rows
    are stored context by context) are held out of training and evaluated on; training batches are
    the store's batches with those rows removed, so a batch can be a few rows short of batch_size.
    Under torchrun each rank reads its share of every global batch (a short one's rows split as
    evenly as they go, ``_training_batches``; a plain stream's with ``rank_slices``); a stream
    built for the job (``harvest_stream(dist=...)``) yields each rank's share itself (the same
    global batches, so ranks run out together). Held-out batches are dealt out to ranks in turn.
    """

    def __init__(self, data: TrainingData, batch_size: int, seed: int, eval_rows: int = 0,
                 ctx: DistributedContext = SINGLE_PROCESS) -> None:
        if isinstance(data, (str, os.PathLike)):
            data = ActivationStore(data)
        self.source = data
        self.batch_size, self.seed = batch_size, seed
        self.ctx = ctx
        self.store = data if isinstance(data, ActivationStore) else None
        scale = getattr(data, "scale_factors", None)
        self.scale_factors = None if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        self.d_model: int | None = getattr(data, "d_model", None)
        self.train_rows_per_shard: np.ndarray | None = None
        if self.store is not None and eval_rows > 0:
            shard_rows = np.array([int(s["n_rows"]) for s in self.store.manifest["shards"]], dtype=np.int64)
            total = int(shard_rows.sum())
            if eval_rows > total // 2:
                raise ConfigError(
                    f"training.eval_rows={eval_rows} (rows held out to measure the crosscoder on) would hold "
                    f"out more than half of the store's {total} rows: lower it to at most {total // 2} "
                    f"(`mneme train --eval-rows N`, training.eval_rows in a config), or harvest more tokens."
                )
            held = np.ceil(shard_rows * eval_rows / max(1, total)).astype(np.int64)
            self.train_rows_per_shard = shard_rows - held

    def metadata(self) -> dict[str, Any]:
        if self.store is None:
            return {"data": "stream"}
        manifest = self.store.manifest
        keys = ("base_model", "edited_model", "layer", "hook_name", "context_length", "n_tokens")
        meta = {key: manifest.get(key) for key in keys if key in manifest}
        meta["store"] = str(self.store.path)
        return meta

    def identity(self) -> dict[str, Any]:
        """What pins the rows a store gives (its manifest, digested): the same path harvested again
        (``--overwrite``, another dtype or corpus) holds other activations. For a harvest stream, its
        harvest settings with the forward batch size (a runtime field for a store, but the stream's shuffle
        buffer fills a forward batch at a time, so its batches change with it). Nothing for a plain stream."""
        if self.store is not None:
            return {"store_manifest": json_digest(self.store.manifest)}
        harvest = getattr(self.source, "config", None)
        if isinstance(harvest, HarvestConfig):
            return {"stream_harvest": json_digest({**harvest.result_dict(), "batch_size": harvest.batch_size})}
        return {}

    def batches(self, start_step: int) -> Iterator[torch.Tensor]:
        if self.store is not None:
            if self.train_rows_per_shard is None:
                return self.store.iter_batches(self.batch_size, seed=self.seed, start_step=start_step,
                                               rank=self.ctx.rank, world_size=self.ctx.world_size)
            return self._training_batches(start_step)
        # A stream cannot seek: replay it up to the resume point (deterministic streams only).
        stream = itertools.islice(iter(self.source), start_step, None)  # type: ignore[arg-type]
        if not self.ctx.is_distributed:
            return stream
        if getattr(self.source, "dist", SINGLE_PROCESS).is_distributed:  # this rank's share already
            return stream
        return rank_slices(stream, self.ctx)

    def _training_batches(self, start_step: int) -> Iterator[torch.Tensor]:
        """The store's batches without the held-out rows (this rank's share of each under torchrun).

        Held-out rows leave a global batch of N rows a few short of batch_size, N not always a multiple
        of the rank count W: rank r reads rows [r*N//W, (r+1)*N//W) (shares differ by a row at most;
        the trainer weighs each rank's loss by its rows), so W ranks train on every row of one
        process's batches."""
        store, keep_below = self.store, self.train_rows_per_shard
        assert store is not None and keep_below is not None
        rank, world = self.ctx.rank, self.ctx.world_size
        for step in itertools.count(start_step):
            pairs = store.batch_rows(step, self.batch_size, seed=self.seed)
            pairs = pairs[pairs[:, 1] < keep_below[pairs[:, 0]]]
            n = len(pairs)
            yield store.gather(pairs[rank * n // world : (rank + 1) * n // world])

    def held_out_batches(self) -> Iterator[torch.Tensor]:
        """The held-out rows of the store, batch_size at a time, in store order (under torchrun,
        batch i goes to rank i mod W)."""
        store, keep_below = self.store, self.train_rows_per_shard
        if store is None or keep_below is None:
            return
        shard_rows = [int(entry["n_rows"]) for entry in store.manifest["shards"]]
        parts = [
            np.stack([np.full(n - start, shard), np.arange(start, n)], axis=1)
            for shard, (start, n) in enumerate(zip(keep_below.tolist(), shard_rows))
            if n > start
        ]
        pairs = np.concatenate(parts)
        step = self.batch_size * self.ctx.world_size
        for begin in range(self.ctx.rank * self.batch_size, len(pairs), step):
            yield store.gather(pairs[begin : begin + self.batch_size])


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run (checkpoints appear by an atomic rename)."""
    return checkpoints.latest_checkpoint(run_dir)


def save_checkpoint(trainer: BatchTopKCrossCoderTrainer, run_dir: Path, step: int, keep: int) -> Path:
    def write(tmp: Path) -> None:
        trainer.ae.save_pretrained(tmp)
        # The weights are the checkpoint's crosscoder files; the trainer state holds the rest (Adam's moments,
        # schedule, counters), not the weights a second time (a quarter of a checkpoint's size).
        state = trainer.state_dict()
        del state["ae"]
        torch.save(state, tmp / STATE_FILE)

    return checkpoints.write_checkpoint(run_dir, step, write, keep)


def disk_need(crosscoder: CrossCoderConfig, training: TrainingConfig) -> tuple[int, int, int]:
    """(bytes of one checkpoint, of the checkpoints at once at most, of the final crosscoder) for a resolved
    crosscoder config: a checkpoint holds the weights (``model.safetensors``) and Adam's two moments (the
    trainer state); ``keep_checkpoints`` stay while the next one is written."""
    width = torch.empty((), dtype=getattr(torch, crosscoder.dtype)).element_size()
    weights = crosscoder.parameter_count * width
    checkpoint = 3 * weights
    written = (training.steps - 1) // training.checkpoint_every if training.checkpoint_every else 0
    return checkpoint, min(written, training.keep_checkpoints + 1) * checkpoint, weights


def _require_room(run_dir: Path, crosscoder: CrossCoderConfig, training: TrainingConfig) -> None:
    """Refuse to start (or resume) a training whose checkpoints and final crosscoder do not fit its disk (less
    what its checkpoints hold already)."""
    checkpoint, checkpoints_at_once, final = disk_need(crosscoder, training)
    require_free_space(run_dir, checkpoints_at_once + final - tree_size(run_dir / CHECKPOINT_DIR),
                       f"Training ({crosscoder.parameter_count / 1e6:,.1f}M parameters; up to "
                       f"{training.keep_checkpoints + 1} checkpoints of {size_text(checkpoint)} while one is written, "
                       "then the crosscoder)",
                       "free space there, choose a run directory on a larger disk (--out), or keep fewer checkpoints "
                       "(training.keep_checkpoints in the YAML) or none (training.checkpoint_every: 0)")


def _remove_finished_checkpoints(run_dir: Path, training: TrainingConfig) -> None:
    """Once the crosscoder and its metrics are written, its resume checkpoints serve nothing (a finished run
    loads the crosscoder; another config starts over): remove them unless ``keep_finished_checkpoints``."""
    size = 0 if training.keep_finished_checkpoints else remove_finished_checkpoints(run_dir)
    if size:
        logger.info("Removed the training checkpoints (%s; training.keep_finished_checkpoints keeps them).",
                    size_text(size))


def load_checkpoint(trainer: BatchTopKCrossCoderTrainer, checkpoint: Path) -> None:
    state = checkpoints.load_state(checkpoint / STATE_FILE, "delete this checkpoint to resume from an older one",
                                   map_location=trainer.device)
    if "ae" not in state:  # the weights from the checkpoint's crosscoder files (earlier versions saved them twice)
        try:
            state["ae"] = BatchTopKCrossCoder.from_pretrained(checkpoint, device=trainer.device).state_dict()
        except CheckpointError as err:
            raise CheckpointError(f"{err} Delete the checkpoint {checkpoint} to resume from an older one, or start "
                                  "over with --no-resume (train(..., resume=False)).") from err
    trainer.load_state_dict(state)


def _results_part(run_config: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's results, from its ``train_config.json``: fields added to the configs
    since the file was written take their defaults; training fields that do not change results
    (device, checkpoint cadence) and the store's path (its manifest's digest, ``data``, pins it) are left out."""
    try:
        crosscoder = CrossCoderConfig.from_dict(run_config.get("crosscoder")).to_dict()
        training = TrainingConfig.from_dict(run_config.get("training")).result_dict()
    except ConfigError:  # written by a version with other fields: compare as written
        return run_config
    # The store's path as it was spelt (relative, absolute) decides nothing: its manifest's digest pins it.
    crosscoder["metadata"] = {k: v for k, v in crosscoder.get("metadata", {}).items() if k != "store"}
    return {"crosscoder": crosscoder, "training": training}


def _check_run_config(run_dir: Path, run_config: dict[str, Any]) -> None:
    path = run_dir / RUN_CONFIG_FILE
    trained = latest_checkpoint(run_dir) is not None or (run_dir / FINAL_DIR).is_dir()
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if trained and not isinstance(previous, dict):
            raise CheckpointError(
                f"{path} is unreadable ({'not a JSON object' if previous is not None else 'not JSON'}), so nothing "
                f"tells which config the checkpoints or crosscoder in {run_dir} were trained with (it is written "
                "atomically: something else changed it). Restore it, or start over here with --no-resume "
                "(train(..., resume=False)), or use a new run directory.")
        if previous is not None and trained and _results_part(previous) != _results_part(run_config):
            differences = checkpoints.config_differences(_results_part(previous), _results_part(run_config))
            raise ForeignOutputError(
                f"{run_dir} holds a training run with another config ({path}: "
                f"{'; '.join(differences[:5]) or 'other fields'}); use a new run directory, or start over "
                "here with --no-resume (train(..., resume=False)).",
                run_dir,
            )
        # Recorded since stores are pinned by their manifest (older runs compare their config alone).
        stored_data = previous.get("data") if isinstance(previous, dict) else None
        if trained and stored_data is not None and stored_data != run_config.get("data"):
            store = run_config["crosscoder"].get("metadata", {}).get("store", "the store")
            streamed = isinstance(stored_data, dict) and "stream_harvest" in stored_data
            why = ("the stream is harvested with other settings, the forward batch size (harvest.batch_size) "
                   "included: it decides the stream's batches" if streamed
                   else f"{store} was harvested again, or is another store")
            raise ForeignOutputError(
                f"{run_dir} holds a training run on other activations ({path}: data {stored_data} vs now "
                f"{run_config.get('data')}: {why}); use a new run "
                "directory, or start over here with --no-resume (train(..., resume=False)).",
                run_dir,
            )
        if trained and previous is not None:
            return
    elif trained:
        raise CheckpointError(
            f"{run_dir} holds checkpoints or a crosscoder but no {RUN_CONFIG_FILE}, so nothing tells which config "
            "they were trained with. Restore the file, or start over here with --no-resume (train(..., "
            "resume=False)), or use a new run directory.")
    # A new run, or a start that never saved a step (it may have failed on its device): this config now.
    atomic_write_text(path, json.dumps(run_config, indent=2))


def train(
    data: TrainingData,
    run_dir: str | os.PathLike[str],
    crosscoder: CrossCoderConfig | dict[str, Any] | None = None,
    training: TrainingConfig | dict[str, Any] | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    on_step: StepCallback | None = None,
    allow_partial: bool = False,
) -> TrainResult:
    """Train a BatchTopK crosscoder on paired activations and write it to ``run_dir``.

    ``data`` is an activation store (or its path) or an iterable of raw (B, 2, d) batches
    exposing ``scale_factors`` (e.g. ``harvest_stream``). With ``resume`` (default) the newest
    checkpoint in ``run_dir`` is continued, and a finished run is loaded instead of retrained.
    ``on_step(step, trainer)`` is called after every step. A store whose harvest did not finish
    (or with damaged shards) is refused unless ``allow_partial`` (CheckpointError). ``run_dir``
    is locked while training: a second ``train`` on it fails at once (OutputLockedError); one holding a
    run of another config, or on other activations, is refused (ForeignOutputError, a ConfigError).
    """
    cc_cfg, tr_cfg = CrossCoderConfig.of(crosscoder), TrainingConfig.of(training)
    problem = cc_cfg.training_problem()
    if problem:
        raise ConfigError(problem)
    run_dir = Path(run_dir)
    # Refused before the process group starts: no rank waits for the others to learn it.
    check_divisible(tr_cfg.batch_size, job_world_size())
    # Under torchrun: one rank of a data-parallel job (crosscoder/distributed.py); rank 0 writes and locks.
    ctx = distributed_context(tr_cfg.device)
    with ctx.together("opening the activation store"):  # a rank that cannot read it stops every rank
        if isinstance(data, (str, os.PathLike)):
            data = ActivationStore(data)
        if isinstance(data, ActivationStore):  # before the lock: a bad store leaves no run directory behind
            data.require_complete(allow_partial, use="training")
    with main_rank_lock(ctx, run_dir, "run directory (--out)"):  # rank 0 holds it for the job
        return _train(data, run_dir, cc_cfg, tr_cfg, ctx, resume=resume, progress=progress, on_step=on_step)


def _require_one_folder_view(ctx: DistributedContext, run_dir: Path) -> None:
    """Every rank decides from the output folder whether the training is finished and from which checkpoint
    it resumes: ranks that see different folders (nodes without a shared filesystem) would wait for each
    other's collectives until the process group times out. Refused on every rank instead, with what each saw."""
    def seen() -> str:
        if training_finished(run_dir):
            return "a finished crosscoder"
        checkpoint = latest_checkpoint(run_dir)
        return f"checkpoint {checkpoint.name}" if checkpoint is not None else "no checkpoint"

    views = ctx.all_gather_object(seen())
    if len(set(views)) > 1:
        raise ConfigError(
            f"The ranks see different contents in the output folder {run_dir} ("
            + ", ".join(f"rank {r}: {v}" for r, v in enumerate(views)) + "): on several nodes it must be one "
            "folder every node sees (a shared filesystem, at the same path), or the ranks cannot resume together.")


def _train(data: TrainingData, run_dir: Path, cc_cfg: CrossCoderConfig, tr_cfg: TrainingConfig,
           ctx: DistributedContext, *, resume: bool, progress: bool, on_step: StepCallback | None) -> TrainResult:
    progress = progress and ctx.is_main
    source = _Data(data, tr_cfg.batch_size, tr_cfg.seed, tr_cfg.eval_rows, ctx)

    d_model = source.d_model or cc_cfg.activation_dim
    if d_model is None:
        raise ConfigError("Cannot tell the activation width: set crosscoder.activation_dim for a plain stream.")
    cc_cfg = cc_cfg.resolve(int(d_model))
    cc_cfg = cc_cfg.replace(metadata={**source.metadata(), **cc_cfg.metadata})
    run_config = {"crosscoder": cc_cfg.to_dict(), "training": tr_cfg.to_dict()}
    if source.identity():
        run_config["data"] = source.identity()

    final_dir, metrics_path = run_dir / FINAL_DIR, run_dir / METRICS_FILE
    if ctx.is_distributed and resume:
        _require_one_folder_view(ctx, run_dir)
    if resume and training_finished(run_dir):
        _check_run_config(run_dir, run_config)
        logger.info("Training already finished in %s; loading it.", final_dir)
        ctx.on_main(lambda: _remove_finished_checkpoints(run_dir, tr_cfg))  # a kill may have come before they went
        metrics = CrossCoderMetrics(**read_json(metrics_path, "delete it and train again (--no-resume)"))
        return TrainResult(BatchTopKCrossCoder.from_pretrained(final_dir), metrics, run_dir)

    def prepare() -> None:  # rank 0; a refused config stops every rank
        if not resume and run_dir.exists():
            for stale in (final_dir, run_dir / CHECKPOINT_DIR):
                shutil.rmtree(stale, ignore_errors=True)
            for stale_file in (metrics_path, run_dir / RUN_CONFIG_FILE):
                stale_file.unlink(missing_ok=True)
        _check_run_config(run_dir, run_config)
        _require_room(run_dir, cc_cfg, tr_cfg)

    ctx.on_main(prepare)

    for warning in tr_cfg.schedule_warnings():
        logger.warning(warning)
    device = ctx.device(tr_cfg.device)
    scale = source.scale_factors
    if scale is None:
        logger.warning("The data carries no normalisation factors; training on unscaled activations.")
    trainer_class = DistributedBatchTopKCrossCoderTrainer if ctx.is_distributed else BatchTopKCrossCoderTrainer
    trainer = trainer_class.from_configs(
        cc_cfg, tr_cfg, activation_scale=None if scale is None else scale.tolist(), device=str(device)
    )
    start_step = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        load_checkpoint(trainer, checkpoint)
        start_step = trainer.steps_done
        logger.info("Resuming from %s (step %d of %d).", checkpoint, start_step, tr_cfg.steps)

    bar = tqdm(total=tr_cfg.steps, initial=start_step, desc="train crosscoder", disable=not progress, unit="step")
    batches = source.batches(start_step)
    x: torch.Tensor | None = None
    for step in range(start_step, tr_cfg.steps):
        # The ranks meet before each step (one flag all-reduced): a rank that fails reading its batch
        # or in on_step stops the others with its error, not in the middle of the step's collectives.
        with ctx.together("while training"):
            try:
                x = next(batches)
            except StopIteration:
                raise ConfigError(
                    f"The data stream ended after {step} batches, before steps={tr_cfg.steps}; "
                    "lower steps or provide more data."
                ) from None
        trainer.update(step, x)
        losses = trainer.last_losses
        if losses is not None and not torch.isfinite(torch.tensor(losses.loss)):
            raise NonFiniteActivationError(
                f"The training loss became {losses.loss} at step {step}; check the activations for NaN/inf "
                "or lower the learning rate. The last checkpoint is intact."
            )
        if on_step is not None:
            with ctx.together("while training"):
                on_step(step, trainer)
        if losses is not None and (step % 10 == 0 or step == tr_cfg.steps - 1):
            bar.set_postfix(
                loss=f"{losses.loss:.4g}", l0=f"{losses.l0:.1f}",
                dead=f"{losses.dead_fraction:.1%}", ev=f"{losses.explained_variance:.3f}",
            )
        bar.update(1)
        done = step + 1
        if tr_cfg.checkpoint_every and done % tr_cfg.checkpoint_every == 0 and done < tr_cfg.steps:
            # Rank 0 writes; a failed write stops every rank (none waits on a barrier for it).
            ctx.on_main(lambda: save_checkpoint(trainer, run_dir, done, tr_cfg.keep_checkpoints) and None)
    bar.close()

    crosscoder_model = trainer.ae.eval()
    eval_data = EVAL_HELD_OUT
    eval_batches: Iterable[torch.Tensor] = source.held_out_batches()  # whole batches, dealt out to ranks
    rank_slices = False  # True: each rank holds its slice of every evaluated batch (the training batches' split)
    if source.store is None:
        # A stream: evaluate on the batches that follow the training ones (never seen by the
        # optimiser); if it is exhausted, on the last training batch.
        eval_data = EVAL_STREAM
        eval_batches = list(itertools.islice(batches, max(1, tr_cfg.eval_rows // tr_cfg.batch_size)))
        rank_slices = True
        if not eval_batches and x is not None:
            logger.warning("The data stream has no rows left for evaluation; reporting on the last training batch.")
            eval_data, eval_batches = EVAL_TRAINING_BATCH, [x]
    elif tr_cfg.eval_rows == 0:
        logger.warning("eval_rows is 0: metrics.json reports on the last training batch, not on unseen rows.")
        eval_data, eval_batches = EVAL_TRAINING_BATCH, [x] if x is not None else []
        rank_slices = True
    # Each rank evaluates its share; the figures are reduced over ranks (one process's figures). Slices of
    # global batches are encoded, before a threshold exists, by BatchTopK over the global batch.
    metrics = evaluate_crosscoder(crosscoder_model, eval_batches, training_dead_mask=trainer.dead_mask,
                                  eval_data=eval_data, dist=ctx, rank_slices=rank_slices)

    def write_final() -> None:  # rank 0 writes the crosscoder and its metrics
        # Durable: the (fsynced) checkpoints that could redo them go next.
        atomic_directory(final_dir, crosscoder_model.save_pretrained, overwrite=True, durable=True)
        atomic_write_text(metrics_path, json.dumps(metrics.to_dict(), indent=2), durable=True)
        logger.info("Crosscoder written to %s, metrics to %s.", final_dir, metrics_path)
        _remove_finished_checkpoints(run_dir, tr_cfg)

    ctx.on_main(write_final)
    return TrainResult(crosscoder_model, metrics, run_dir)


def load_training_metrics(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The quality figures a finished training run wrote (``metrics.json``)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the training run in {run_dir} has not finished.")
    return read_json(path, "train again (--no-resume)")
