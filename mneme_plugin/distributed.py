"""Data parallelism through PyTorch's own engine (``torch.distributed``, launched by ``torchrun``).

Nothing here is a launcher or a communication layer of its own: under ``torchrun`` the usual
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read, the default process group
is initialised once (NCCL for CUDA devices, gloo otherwise), and the stages use a few collectives
through :class:`DistributedContext`. Outside ``torchrun`` the context is a single process and every
collective is the identity, so the same code runs unchanged in both cases.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from mneme_plugin.devices import resolve_device
from mneme_plugin.errors import ConfigError, MnemeError, RankFailedError
from mneme_plugin.files import output_lock

T = TypeVar("T")

# torchrun's environment; WORLD_SIZE > 1 means "we are one rank of several".
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job and the collectives the stages need."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes run files (checkpoints, metrics, manifests)."""
        return self.rank == 0

    def device(self, device: str) -> torch.device:
        """``device`` resolved for this rank: CUDA ranks use their local GPU (``cuda:LOCAL_RANK``)."""
        resolved = resolve_device(device)
        if self.is_distributed and resolved.type == "cuda" and resolved.index is None:
            return torch.device("cuda", self.local_rank)
        return resolved

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors must live: this rank's GPU under NCCL, the CPU under gloo."""
        if self.is_distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- collectives (identity in a single process) ------------------------------------------

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (returns ``tensor``)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack of every rank's ``tensor`` (same shape on all ranks): (world_size, *shape)."""
        if not self.is_distributed:
            return tensor[None]
        out = tensor.new_empty(self.world_size * tensor.numel())
        _all_gather_flat(out, tensor.reshape(-1).contiguous())
        return out.view(self.world_size, *tensor.shape)

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (dim 0) of ``tensor`` in rank order, concatenated; ranks may hold different
        numbers of rows (the other dimensions are the same). One process: ``tensor``."""
        if not self.is_distributed:
            return tensor
        counts = self.all_gather(torch.tensor([tensor.shape[0]], device=tensor.device))[:, 0].tolist()
        padded = tensor.new_zeros(max(counts), *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded)
        return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])

    def all_agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank (one one-element all-reduce)."""
        if not self.is_distributed:
            return flag
        return bool(self.all_min(torch.tensor([int(flag)], device=self.comm_device)).item())

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.is_distributed:
            dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """A picklable object of rank ``src`` on every rank (small control data only)."""
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[None]:
        """A block every rank runs without collectives inside, ending at a meeting of all ranks. If it
        raises on any rank, every rank raises at the meeting: that rank its own error, the others a
        ``RankFailedError`` naming the rank and its error ("Rank 1 failed while harvesting: OSError:
        ..."), instead of meeting a dead rank at their next collective (gloo: "Connection closed by
        peer"). One process: the block as it is. ``what`` says what the ranks were doing."""
        if not self.is_distributed:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as err:  # noqa: BLE001 - raised at the meeting, after telling the others
            error = err
        failed = self.all_max(torch.tensor([int(error is not None)], device=self.comm_device))
        if not failed.item():
            return
        notes = self.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        raise RankFailedError("; ".join(f"Rank {rank} failed {what}: {note}"
                                        for rank, note in enumerate(notes) if note is not None))

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone, its result on every rank. If it raises, every rank raises:
        rank 0 its own error, the others the same ``MnemeError`` (or a ``RankFailedError`` naming
        it), instead of waiting for a rank that will never come."""
        if not self.is_distributed:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                error = err
                sent = err if isinstance(err, MnemeError) else RankFailedError(
                    f"Rank 0 failed: {type(err).__name__}: {err}")
                outcome = (False, sent)
        try:
            outcome = self.broadcast_object(outcome)
        except Exception:  # unpicklable result or error: say so in words
            outcome = self.broadcast_object((False, RankFailedError(f"Rank 0 failed: {error!r}")))
        if error is not None:
            raise error
        ok, value = outcome
        if not ok:
            raise value
        return value


SINGLE_PROCESS = DistributedContext()
# ``all_gather_into_tensor`` was renamed ``all_gather_single`` (torch 2.10+ warns on the old name).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and all(key in os.environ for key in _ENV_KEYS)


# Set while this process works alone (``local_only``): rank 0 running the stages after training.
_LOCAL_ONLY: list[bool] = []


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within it ``distributed_context()`` is one process, even under torchrun: for work that rank 0
    does alone (the stages of ``mneme run`` after training) while the other ranks have left."""
    _LOCAL_ONLY.append(True)
    try:
        yield
    finally:
        _LOCAL_ONLY.pop()


def job_world_size() -> int:
    """The number of ranks ``distributed_context`` will join, read from torchrun's environment
    before any process group starts (for checks that must not wait for the other ranks)."""
    if _LOCAL_ONLY:
        return 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def distributed_context(device: str = "auto") -> DistributedContext:
    """The job this process belongs to; initialises the default process group under torchrun.

    ``device`` picks the backend when the group is created here: NCCL when it resolves to CUDA,
    gloo otherwise (CPU runs, tests). An already initialised group is used as it is.
    """
    if _LOCAL_ONLY:
        return SINGLE_PROCESS
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend=backend, store=_meet_every_rank(rank, world), rank=rank, world_size=world)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)


# How long a rank waits for the others to join the job (seconds); the collectives keep torch's timeout.
INIT_TIMEOUT_ENV = "MNEME_DIST_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S = 600.0


def init_timeout_s() -> float:
    raw = os.environ.get(INIT_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_INIT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{INIT_TIMEOUT_ENV}={raw!r}: give the seconds a rank waits for the others, a number > 0.")
    return value


def _meet_every_rank(rank: int, world: int) -> Any:
    """torch's own env:// store, once every rank has checked in on it, within ``init_timeout_s``
    (torch would wait 30 minutes in the process group's set-up, then fail without naming the rank)."""
    from datetime import timedelta

    timeout = init_timeout_s()
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    # A torchrun restart reuses its agent's store: each attempt checks in under its own keys.
    arrived = f"mneme/arrived/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    keys = [f"{arrived}/{r}" for r in range(world)]
    store = None
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=timeout)))
        store.set(keys[rank], "1")
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as err:  # noqa: BLE001 - torch's timeout and connection errors, said in words
        missing = "" if store is None else \
            "; missing: rank " + ", ".join(str(r) for r in range(world) if not store.check([keys[r]]))
        raise RankFailedError(
            f"Rank {rank} waited {timeout:g} s for the other ranks of the job ({world} in all, rendezvous at "
            f"{where}){missing}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
            "Check that every node started the same torchrun command (--nnodes, --nproc_per_node, the "
            "rendezvous endpoint), that each node reaches that address, and the missing ranks' logs for an "
            f"error before they started; set {INIT_TIMEOUT_ENV} (seconds) to wait longer."
        ) from err
    return store


@contextlib.contextmanager
def main_rank_lock(ctx: DistributedContext, folder: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """``files.output_lock`` for a job: rank 0 takes the lock on ``folder`` and holds it while the
    block runs; if it cannot (another job has the folder), every rank raises ``OutputLockedError``
    before any of them writes. One process: the lock itself."""
    with contextlib.ExitStack() as stack:
        ctx.on_main(lambda: stack.enter_context(output_lock(folder, what)) and None)
        yield Path(folder)


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m module args...`` (single node), as an argv."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}.")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]


def relaunch_under_torchrun(nproc: int, module: str, args: Sequence[str]) -> NoReturn:
    """Become ``torchrun`` running ``python -m module args`` as ``nproc`` ranks on this node (this process is
    replaced: same pid, torchrun's exit code). A child torchrun would keep training, and keep the output
    folder's lock, when a supervisor, ``kill`` or a container stop sends SIGTERM to this process alone;
    torchrun itself stops its ranks on SIGTERM, SIGINT and SIGHUP."""
    if launched_by_torchrun():
        raise ConfigError("--nproc is for launching: this process already runs under torchrun.")
    command = torchrun_command(nproc, module, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (to relaunch a command without it)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
