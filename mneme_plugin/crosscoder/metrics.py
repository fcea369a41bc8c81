"""Quality figures of a crosscoder: explained variance per model, MSE, L0, dead fraction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from mneme_plugin.crosscoder.model import BatchTopKCrossCoder
from mneme_plugin.crosscoder.sparse import global_batch_topk_indices
from mneme_plugin.distributed import SINGLE_PROCESS, DistributedContext


# Where metrics.json's tokens come from (``CrossCoderMetrics.eval_data``).
EVAL_HELD_OUT = "held_out"  # store rows held out of training (TrainingConfig.eval_rows)
EVAL_STREAM = "stream_after_training"  # the stream's batches after the training ones
EVAL_TRAINING_BATCH = "training_batch"  # last resort: the last training batch (an exhausted stream)
EVAL_GIVEN = "given"  # batches passed by the caller


@dataclass
class CrossCoderMetrics:
    """Reconstruction quality on a set of tokens (paper targets: <15% dead, >95% explained)."""

    explained_variance_base: float
    explained_variance_edited: float
    # Mean over tokens of the squared error summed over both models, in normalised units
    # (activations scaled so that E||x|| = sqrt(d)).
    mse: float
    l0: float
    # Share of latents that never fired on the evaluation tokens.
    dead_fraction: float
    # "evaluation": dead_fraction above; kept for files written before dead_fraction_training existed.
    dead_fraction_source: str
    n_tokens: int
    # The training counter: share of latents that had not fired for dead_after_tokens when training
    # ended (None where not measured, e.g. an evaluation outside training).
    dead_fraction_training: float | None = None
    # Which tokens were evaluated (EVAL_* above); only "held_out" and "stream_after_training" are unseen.
    eval_data: str = EVAL_GIVEN

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


@torch.no_grad()
def evaluate_crosscoder(
    crosscoder: BatchTopKCrossCoder,
    batches: Iterable[torch.Tensor],
    training_dead_mask: torch.Tensor | None = None,
    eval_data: str = EVAL_GIVEN,
    dist: DistributedContext = SINGLE_PROCESS,
    rank_slices: bool = False,
) -> CrossCoderMetrics:
    """Evaluate with the inference encoding (threshold once estimated, else BatchTopK).

    Under data parallelism each rank passes its share of the tokens; the sums are all-reduced, so
    every rank returns the figures of all the tokens together (one process's figures). With
    ``rank_slices`` each rank's batch i is its slice of one global batch i (consecutive rows in rank
    order, every rank the same number of batches): BatchTopK, before an inference threshold exists,
    then selects over the global batch (one all-reduce and one all-gather per batch), as one process
    does on the whole batch; without it each batch is whole, and is encoded alone.
    """
    device = crosscoder.W_enc.device
    encode = crosscoder.encode
    batch_dependent = isinstance(crosscoder, BatchTopKCrossCoder) and float(crosscoder.threshold) < 0
    if rank_slices and dist.is_distributed and batch_dependent:
        encode = _global_batch_topk_encoder(crosscoder, dist)
    n_models, d = crosscoder.cfg.num_models, crosscoder.activation_dim
    sum_x = torch.zeros(n_models, d, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros(n_models, dtype=torch.float64, device=device)
    sum_err = torch.zeros(n_models, dtype=torch.float64, device=device)
    fired = torch.zeros(crosscoder.dict_size, dtype=torch.bool, device=device)
    n_tokens, n_active = 0, 0
    for x in batches:
        x = x.to(device)
        f = encode(x)
        x_norm = crosscoder.normalize(x).double()
        x_hat_norm = crosscoder.normalize(crosscoder.decode(f)).double()
        sum_x += x_norm.sum(0)
        sum_x2 += x_norm.pow(2).sum(dim=(0, 2))
        sum_err += (x_norm - x_hat_norm).pow(2).sum(dim=(0, 2))
        active = f != 0
        fired |= active.any(0)
        n_active += int(active.sum())
        n_tokens += x.shape[0]
    counts = dist.all_sum(torch.tensor([n_tokens, n_active], dtype=torch.float64, device=device))
    n_tokens, n_active = int(counts[0]), int(counts[1])
    for total in (sum_x, sum_x2, sum_err):
        dist.all_sum(total)
    fired = dist.all_max(fired.to(torch.int32)).bool()
    if n_tokens == 0:
        raise ValueError("No tokens to evaluate the crosscoder on.")
    total_var = sum_x2 - sum_x.pow(2).sum(-1) / n_tokens
    explained = (1 - sum_err / total_var.clamp_min(1e-12)).tolist()
    training_dead = None if training_dead_mask is None else float(training_dead_mask.float().mean())
    return CrossCoderMetrics(
        explained_variance_base=explained[0],
        explained_variance_edited=explained[1],
        mse=float(sum_err.sum() / n_tokens),
        l0=n_active / n_tokens,
        dead_fraction=float((~fired).float().mean()),
        dead_fraction_source="evaluation",
        n_tokens=n_tokens,
        dead_fraction_training=training_dead,
        eval_data=eval_data,
    )


def _global_batch_topk_encoder(crosscoder: BatchTopKCrossCoder,
                               dist: DistributedContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` of a rank's slice of a global batch, with BatchTopK over the global batch (k times
    its rows): this rank's rows of the codes one process gets for the whole batch."""
    if not crosscoder.shared_code:
        raise ValueError(f"BatchTopK over ranks' slices needs a shared code; {crosscoder.architecture!r} has one "
                         "code per model: evaluate whole batches on each rank.")

    def select(salience: torch.Tensor, _local_keep: int) -> torch.Tensor:
        rows = dist.all_sum(torch.tensor([salience.shape[0]], dtype=torch.long, device=salience.device))
        return global_batch_topk_indices(salience, crosscoder.k * int(rows.item()), dist)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return crosscoder.sparsify(crosscoder.pre_activations(crosscoder.normalize(x)), False, select)

    return encode
