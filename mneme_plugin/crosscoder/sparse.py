"""Sparse kernels of the training step.

BatchTopK keeps k*B of the B*m pre-activations. Only those need the decoder and the encoder's
backward, so the step is one dense encoder matmul plus O(k*B*d) work:
- the decoder is an ``embedding_bag`` over the active latents of each row;
- the encoder's gradient is scattered from the active (row, latent) pairs only, through a custom
  autograd function, instead of the dense (B, m) gradient a masked matmul would back-propagate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mneme_plugin.distributed import DistributedContext


@dataclass
class ActiveLatents:
    """The active (row, latent) pairs of a batch, sorted by row, and their unscaled values."""

    rows: torch.Tensor  # (nnz,) int64, non-decreasing
    latents: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,) pre-activations (differentiable w.r.t. encoder)
    batch_size: int
    dict_size: int

    def offsets(self) -> torch.Tensor:
        """Start of each row's entries, as ``embedding_bag`` wants them."""
        arange = torch.arange(self.batch_size, device=self.rows.device)
        return torch.searchsorted(self.rows, arange)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(
            self.batch_size, self.dict_size, dtype=self.values.dtype, device=self.values.device
        )
        dense[self.rows, self.latents] = self.values.detach()
        return dense


class _GatheredEncoder(torch.autograd.Function):
    """Returns pre-activations already computed densely; back-propagates to the encoder sparsely."""

    @staticmethod
    def forward(ctx, W_enc_flat, b_enc, x_flat, rows, latents, values):  # type: ignore[override]
        ctx.save_for_backward(x_flat, rows, latents)
        ctx.dict_size = W_enc_flat.shape[1]
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        x_flat, rows, latents = ctx.saved_tensors
        dict_size = ctx.dict_size
        grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # dL/dW[:, j] = sum over active rows i of g_ij x_i: an embedding_bag of x's rows,
            # one bag per latent, with no (nnz, in_dim) intermediate.
            order = latents.argsort(stable=True)
            by_latent = latents.index_select(0, order)
            offsets = torch.searchsorted(by_latent, torch.arange(dict_size, device=latents.device))
            grad_W_t = F.embedding_bag(
                rows.index_select(0, order),
                x_flat,
                offsets,
                mode="sum",
                per_sample_weights=grad_values.index_select(0, order).to(x_flat.dtype),
            )
            grad_W = grad_W_t.t()
        if ctx.needs_input_grad[1]:
            grad_b = torch.zeros(dict_size, dtype=grad_values.dtype, device=grad_values.device)
            grad_b.index_add_(0, latents, grad_values)
        return grad_W, grad_b, None, None, None, None


def batch_topk_indices(salience: torch.Tensor, keep: int) -> torch.Tensor:
    """Flat indices of the ``keep`` largest entries of ``salience`` (any shape), unordered.

    Exact, but faster than one topk over all B*m entries: a random sample gives a cut-off that
    about 2*keep entries exceed; topk then runs over those candidates only. Falls back to the full
    topk when the cut-off is too high.
    """
    flat = salience.reshape(-1)
    total = flat.numel()
    keep = min(keep, total)
    if total < 64 * keep or total < 1 << 16:
        return flat.topk(keep, sorted=False).indices
    n_sample = 1 << 16
    generator = torch.Generator(device=flat.device).manual_seed(0)
    sample = flat[torch.randint(0, total, (n_sample,), generator=generator, device=flat.device)]
    rank = min(n_sample, int(2 * keep * n_sample / total) + 32)
    cutoff = sample.topk(rank, sorted=True).values[-1]
    candidates = (flat >= cutoff).nonzero().squeeze(1)
    if candidates.numel() < keep:
        return flat.topk(keep, sorted=False).indices
    top = flat.index_select(0, candidates).topk(keep, sorted=False).indices
    return candidates.index_select(0, top)


def global_batch_topk_indices(salience: torch.Tensor, keep: int, ctx: "DistributedContext") -> torch.Tensor:
    """Flat indices into this rank's ``salience`` of its share of the global top ``keep`` entries.

    ``keep`` counts over all ranks' salience matrices together (k times the global batch). Each
    rank offers its local top ``keep`` (a superset of its share), all ranks all-gather those
    candidates and find the same cut-off; ties at the cut-off go to ranks in rank order. So the
    selection is exactly the one a single process makes over the whole batch.
    """
    if not ctx.is_distributed:
        return batch_topk_indices(salience, keep)
    flat = salience.reshape(-1)
    local_keep = min(keep, flat.numel())
    local_index = batch_topk_indices(salience, local_keep)
    local_values = flat.index_select(0, local_index)
    padded = torch.full((keep,), float("-inf"), dtype=flat.dtype, device=flat.device)
    padded[:local_keep] = local_values
    candidates = ctx.all_gather(padded)  # (W, keep)
    cutoff = candidates.reshape(-1).topk(keep, sorted=False).values.min()
    above = (candidates > cutoff).sum(dim=1)
    ties = (candidates == cutoff).sum(dim=1)
    # Ties at the cut-off: as many as are still missing, taken in rank order.
    missing = keep - int(above.sum())
    before = int(ties[: ctx.rank].sum())
    my_ties = max(0, min(int(ties[ctx.rank]), missing - before))
    keep_mask = local_values > cutoff
    if my_ties:
        tie_positions = (local_values == cutoff).nonzero().squeeze(1)[:my_ties]
        keep_mask[tie_positions] = True
    return local_index[keep_mask]


def gather_active(
    W_enc_flat: torch.Tensor,
    b_enc: torch.Tensor,
    x_flat: torch.Tensor,
    salience: torch.Tensor,
    weights: torch.Tensor,
    flat_index: torch.Tensor,
) -> ActiveLatents:
    """Active pairs from flat indices into the (B, m) salience matrix.

    ``salience`` = pre * weights was computed without autograd; the kept pairs' pre-activations
    (salience / weight) get a sparse gradient path to ``W_enc_flat`` (in_dim, m) and ``b_enc``.
    Pairs whose salience is not positive are dropped (ReLU has no gradient there and they
    contribute nothing).
    """
    batch_size, dict_size = salience.shape
    flat_index, _ = flat_index.sort()
    kept = salience.reshape(-1).index_select(0, flat_index)
    positive = kept > 0
    if not bool(positive.all()):
        flat_index, kept = flat_index[positive], kept[positive]
    rows = torch.div(flat_index, dict_size, rounding_mode="floor")
    latents = flat_index - rows * dict_size
    values = kept / weights.index_select(0, latents)
    values = _GatheredEncoder.apply(W_enc_flat, b_enc, x_flat, rows, latents, values)
    return ActiveLatents(rows, latents, values, batch_size, dict_size)


def sparse_decode(active: ActiveLatents, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j f_ij W_dec[l, j] for each model l, without bias: (B, num_models, d)."""
    offsets = active.offsets()
    outs = [
        F.embedding_bag(
            active.latents,
            W_dec[model],
            offsets,
            mode="sum",
            per_sample_weights=active.values.to(W_dec.dtype),
        )
        for model in range(W_dec.shape[0])
    ]
    return torch.stack(outs, dim=1)
