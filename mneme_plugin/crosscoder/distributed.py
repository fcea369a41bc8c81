"""Data-parallel BatchTopK training: every rank holds a slice of one global batch.

The step's maths has one home, ``BatchTopKCrossCoderTrainer`` (trainer.py), written against a
``DistributedContext`` whose collectives are the identity in one process; the class here only
joins the process group and keeps the replicas identical.

Semantics (the same crosscoder as one process on the same global batch, up to float summation
order):

* Batch: step s's global batch is the one a single process would draw; rank r holds its rows
  [r*B/W, (r+1)*B/W) (``batch_size`` must be a multiple of the world size W). A batch that a
  store's held-out rows leave N < B rows long is split as evenly as it goes, rows
  [r*N//W, (r+1)*N//W); every quantity below counts the global batch's N rows (one all-reduce of
  the row count per step), and each rank's loss is weighted by its rows.
* BatchTopK is global-exact: each rank takes its local top k*B (never fewer than it contributes to
  the global top k*B), all ranks all-gather those candidate saliences (W*k*B floats), every rank
  finds the same global cut-off (the k*B-th largest) and keeps its own entries above it; ties at
  the cut-off (frequent under bf16 autocast) go to ranks in rank order and within a rank in index
  order: the lowest global flat indices, the entries one process keeps (``batch_topk_indices``
  breaks ties the same way, never as topk happens to). The local candidates are a superset of what
  is needed, so the selection is exactly one process's selection.
* Losses are means over the local rows; gradients are averaged over ranks by PyTorch's
  ``DistributedDataParallel`` (bucketed all-reduces overlapped with backward), which is the
  gradient of the global mean (shares of unequal size: each rank's loss times local*W/N first). DDP was measured against one coalesced all-reduce after backward
  (``benchmarks/bench_allreduce.py``, README): the same weights, DDP 25% faster per step. The aux-k loss is
  normalised by the variance of the global residual (all-reduced sums).
  Those are ``sparse.global_batch_topk_indices`` and ``BatchTopKCrossCoderTrainer._aux_loss``.
* The decoder bias is initialised from the geometric median of the whole first global batch
  (all-gathered once).
* Dead-latent counters: a latent fired in the step if it fired on any rank (all-reduce MAX of the
  fired mask); every rank adds the global batch size. The threshold EMA uses the smallest kept
  salience over all ranks (all-reduce MIN). Both stay identical on every rank.
* The final evaluation (``metrics.json``): held-out batches are dealt out whole to ranks; the last
  training batch or a stream's following batches are evaluated as each rank's slice, encoded (before
  an inference threshold exists) by BatchTopK over the global batch, as in training.
* Parameters and optimizer state are replicated (identical updates from identical gradients), so a
  checkpoint holds no rank-specific state and resumes with any number of ranks.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch

from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer, _StepOutput
from mneme_plugin.distributed import DistributedContext, distributed_context
from mneme_plugin.errors import ConfigError


# The buffers (threshold, scale factors) stay identical on every rank: no broadcast per forward.
_DDP_OPTIONS = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
_NO_BUFFER_SYNC = {"forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers": False}


class _TrainingStep(torch.nn.Module):
    """The base trainer's forward as the module DDP wraps (the crosscoder is its only submodule)."""

    def __init__(self, trainer: BatchTopKCrossCoderTrainer) -> None:
        super().__init__()
        self.ae = trainer.ae
        self._trainer = [trainer]  # in a list: not a registered submodule

    def forward(self, x: torch.Tensor) -> _StepOutput:
        return BatchTopKCrossCoderTrainer._forward(self._trainer[0], x)


class DistributedBatchTopKCrossCoderTrainer(BatchTopKCrossCoderTrainer):
    """``BatchTopKCrossCoderTrainer`` for one rank of a data-parallel job (see the module docstring).

    ``update(step, x)`` takes this rank's slice of the global batch. In a single process it is the
    base trainer.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dist = distributed_context(str(self.device))
        # Same seed gives the same initialisation everywhere; broadcasting makes it certain.
        self.broadcast_parameters()
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(_TrainingStep(self), device_ids=device_ids,
                                                             **_NO_BUFFER_SYNC)

    def _forward(self, x: torch.Tensor) -> _StepOutput:
        # The base trainer's step, through DDP so that backward all-reduces the gradients.
        return self.ddp(x)

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Rank 0's weights and buffers on every rank (after initialisation or loading)."""
        for tensor in [*self.ae.parameters(), *self.ae.buffers(), self.tokens_since_fired]:
            self.dist.broadcast_(tensor)

    def load_state_dict(self, state) -> None:  # type: ignore[override]
        super().load_state_dict(state)
        self.broadcast_parameters()


def check_divisible(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConfigError(
            f"training.batch_size={batch_size} is the global batch; it must be a multiple of the "
            f"number of ranks ({world_size}). Use a batch size divisible by {world_size}."
        )


def rank_slices(batches: Iterator[torch.Tensor], ctx: DistributedContext) -> Iterator[torch.Tensor]:
    """This rank's rows of each global batch of an iterable that every rank reads whole."""
    for batch in batches:
        check_divisible(batch.shape[0], ctx.world_size)
        local = batch.shape[0] // ctx.world_size
        yield batch[ctx.rank * local : (ctx.rank + 1) * local]
