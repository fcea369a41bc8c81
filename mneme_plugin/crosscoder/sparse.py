"""Sparse kernels of the training step.

BatchTopK keeps k*B of the B*m pre-activations. Only those need the decoder and the encoder's
backward, so the step is one dense encoder matmul plus O(k*B*d) work:
- the decoder is an ``embedding_bag`` over the active latents of each row;
- the encoder's gradient is scattered from the active (row, latent) pairs only, through a custom
  autograd function, instead of the dense (B, m) gradient a masked matmul would back-propagate;
- the decoder's gradient is an ``embedding_bag`` too, over the pairs grouped by latent (one sort,
  shared with the encoder's backward).

Index sorts run on one CPU thread (``_sorted_indices``): torch sorts a 1-D integer tensor of at
least 32,768 entries with fbgemm's OpenMP radix sort, which takes 1.2 ms for k*B = 32,768 indices
on one thread but 250-340 ms on two threads when the cores are shared with other processes (its
passes end in barriers that wait for a descheduled thread). That one kernel made the whole step
4x slower on two threads than on one; ``embedding_bag``'s own backward sorts the same way, hence
the custom decoder backward.

On CUDA the same bag sums run as CSR sparse-dense matmuls (cuSPARSE) instead of ``embedding_bag``:
on an H100 at d=3584, m=114,688, k=100, B=4096 the encoder-gradient sum takes 4.1 ms instead of
15.7 and the whole step 72.6 ms instead of 100.0 (``benchmarks/bench_train.py --gpu``).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mneme_plugin.distributed import DistributedContext


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Intra-op threads set to 1 on CPU for the block (restored after); other devices unchanged."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sorted_indices(indices: torch.Tensor, stable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``indices.sort()`` of a 1-D int64 tensor on one thread (the module docstring says why)."""
    with _one_cpu_thread(indices.device):
        return indices.sort(stable=stable)


@dataclass
class LatentOrder:
    """The active pairs grouped by latent: ``order`` permutes pair positions so latents ascend;
    ``offsets[j]`` is where latent j's pairs start (bags, one per latent); ``rows`` is each pair's
    row in that order (shared by the encoder's and the decoder's gradient sums)."""

    order: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor


@dataclass
class _LatentOrderCache:
    """Computed once per batch on first use, by whichever backward needs it first."""

    rows: torch.Tensor
    latents: torch.Tensor
    dict_size: int
    value: LatentOrder | None = field(default=None)

    def get(self) -> LatentOrder:
        if self.value is None:
            by_latent, order = _sorted_indices(self.latents, stable=True)
            arange = torch.arange(self.dict_size, device=self.latents.device)
            self.value = LatentOrder(order, torch.searchsorted(by_latent, arange), self.rows.index_select(0, order))
        return self.value


@dataclass
class ActiveLatents:
    """The active (row, latent) pairs of a batch, sorted by row, and their unscaled values."""

    rows: torch.Tensor  # (nnz,) int64, non-decreasing
    latents: torch.Tensor  # (nnz,) int64
    values: torch.Tensor  # (nnz,) pre-activations (differentiable w.r.t. encoder)
    batch_size: int
    dict_size: int
    by_latent: _LatentOrderCache | None = None

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
    def forward(ctx, W_enc_flat, b_enc, x_flat, latents, values, by_latent):  # type: ignore[override]
        ctx.save_for_backward(x_flat, latents)
        ctx.dict_size, ctx.by_latent = W_enc_flat.shape[1], by_latent
        ctx.latent_major = W_enc_flat.t().is_contiguous()
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        x_flat, latents = ctx.saved_tensors
        dict_size = ctx.dict_size
        grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # dL/dW[:, j] = sum over active rows i of g_ij x_i: an embedding_bag of x's rows,
            # one bag per latent, with no (nnz, in_dim) intermediate: (m, in_dim), so a latent-major
            # encoder (``CrossCoder.encoder_matrix``) takes its transpose as a view. A row-major
            # (in_dim, m) weight gets a 2-D copy: left as a view, autograd would copy it into W_enc's
            # (2, d, m) layout through a 3-D strided copy, several times slower on CPU.
            grad_W = _sum_rows_by_latent(ctx.by_latent.get(), x_flat, grad_values).t()
            if not ctx.latent_major:
                grad_W = grad_W.contiguous()
        if ctx.needs_input_grad[1]:
            grad_b = torch.zeros(dict_size, dtype=grad_values.dtype, device=grad_values.device)
            grad_b.index_add_(0, latents, grad_values)
        return grad_W, grad_b, None, None, None, None


def _kernel_for(table: torch.Tensor, kernel: str | None) -> str:
    """``embedding_bag`` (tuned on CPU, see the module docstring) except for fp32 / fp64 tables on
    CUDA, where a CSR sparse-dense matmul (cuSPARSE) replaces it (``benchmarks/bench_train.py
    --gpu``; the only dtypes measured there: a bf16 crosscoder keeps ``embedding_bag``)."""
    if kernel is None:
        on_gpu = table.device.type == "cuda" and table.dtype in (torch.float32, torch.float64)
        return "csr" if on_gpu else "embedding_bag"
    if kernel not in SPARSE_KERNELS:
        raise ValueError(f"Unknown sparse kernel {kernel!r}: use one of {SPARSE_KERNELS}.")
    return kernel


SPARSE_KERNELS = ("embedding_bag", "csr")


def _bag_sum(indices: torch.Tensor, starts: torch.Tensor, table: torch.Tensor, weights: torch.Tensor,
             kernel: str | None) -> torch.Tensor:
    """(len(starts), width): bag b sums weights_i * table[indices_i] over i in [starts[b], starts[b+1])."""
    weights = weights.to(table.dtype)
    if _kernel_for(table, kernel) == "embedding_bag":
        return F.embedding_bag(indices, table, starts, mode="sum", per_sample_weights=weights)
    crow = torch.cat([starts, starts.new_full((1,), indices.numel())])
    with warnings.catch_warnings():  # "CSR support is in beta": the one op used here is tested against embedding_bag
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(crow, indices, weights, size=(starts.numel(), table.shape[0]),
                                         check_invariants=False)
    with torch.autocast(table.device.type, enabled=False):  # the embedding_bag path's precision
        return matrix @ table


def _sum_rows_by_latent(order: LatentOrder, table: torch.Tensor, weights: torch.Tensor,
                        kernel: str | None = None) -> torch.Tensor:
    """(m, width): for each latent j, sum over its active pairs i of weights_i * table[rows_i]."""
    return _bag_sum(order.rows, order.offsets, table, weights.index_select(0, order.order), kernel)


def _sum_latents_by_row(latents: torch.Tensor, row_offsets: torch.Tensor, table: torch.Tensor,
                        weights: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """(B, width): for each row, sum over its active pairs i of weights_i * table[latents_i]."""
    return _bag_sum(latents, row_offsets, table, weights, kernel)


class _SparseDecoder(torch.autograd.Function):
    """sum_j f_ij D[j] over the (m, n d) decoder table D, (B, n d); backward without embedding_bag's own
    (which sorts the indices with the multi-threaded radix sort)."""

    @staticmethod
    def forward(ctx, table, values, rows, latents, row_offsets, by_latent):  # type: ignore[override]
        ctx.save_for_backward(table, values, rows, latents, row_offsets)
        ctx.by_latent = by_latent
        return _sum_latents_by_row(latents, row_offsets, table, values)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        table, values, rows, latents, row_offsets = ctx.saved_tensors
        grad_table = grad_values = None
        grad_out = grad_out.to(table.dtype).contiguous()
        if ctx.needs_input_grad[0]:
            grad_table = _sum_rows_by_latent(ctx.by_latent.get(), grad_out, values)
        if ctx.needs_input_grad[1]:
            # d/df_ij = <g_i, D[j]>: the kernel embedding_bag's own backward uses for per-sample weights
            # (rows are each pair's bag, mode 0 = sum, no padding index).
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, table, latents, row_offsets, rows, 0, -1
            ).to(values.dtype)
        return grad_table, grad_values, None, None, None, None


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the true entries of a 1-D bool ``mask``, as ``mask.nonzero().squeeze(1)``.

    On CPU a large, sparse mask (BatchTopK's candidates: about 2*k*B of B*m entries) is scanned as
    8-byte words first: nonzero over B*m/8 words, then over the 8 bytes of the words that hold a true
    entry. CPU nonzero costs about as much per entry whatever its value, so this is several times
    faster (14 vs 45 ms at B*m = 8.4M on one thread); the result is identical.
    """
    n = mask.numel()
    if mask.device.type != "cpu" or n < 1 << 16:
        return mask.nonzero().squeeze(1)
    if not mask.is_contiguous() or mask.storage_offset() % 8:  # the int64 view needs whole words
        mask = mask.clone(memory_format=torch.contiguous_format)
    whole = n - n % 8
    by_word = mask[:whole].view(-1, 8)
    words = by_word.view(torch.int64).squeeze(1).nonzero().squeeze(1)  # words holding a true byte
    within = by_word.index_select(0, words).nonzero()  # (word position, byte) of each true entry
    indices = words.index_select(0, within[:, 0]) * 8 + within[:, 1]
    if whole < n:
        indices = torch.cat([indices, whole + mask[whole:].nonzero().squeeze(1)])
    return indices


def _top_from_candidates(flat: torch.Tensor, candidates: torch.Tensor | None, keep: int) -> torch.Tensor:
    """The ``keep`` largest entries of ``flat`` among ``candidates`` (ascending flat indices; None: all),
    ties at the cut-off broken by the lowest index, as ascending flat indices.

    topk finds the cut-off value (the keep-th largest); every entry above it is kept and the rest
    of the budget is filled with the entries equal to it, lowest index first. topk alone would break
    the tie arbitrarily (by its algorithm, the batch's layout and the thread count), so one process
    and the ranks of a data-parallel job would keep different latents of equal salience.
    """
    values = flat if candidates is None else flat.index_select(0, candidates)
    top = values.topk(keep, sorted=False)
    cutoff = top.values.min()
    if bool(cutoff.isnan()):  # NaN saliences (a diverged run): topk's own choice, which keeps them
        chosen = top.indices.sort().values
        return chosen if candidates is None else candidates.index_select(0, chosen)
    chosen = (values >= cutoff).nonzero().squeeze(1)  # everything above the cut-off and every tie
    if candidates is not None:
        chosen = candidates.index_select(0, chosen)
    chosen_values = flat.index_select(0, chosen)
    ties = chosen_values == cutoff
    missing = keep - (chosen_values > cutoff).sum()
    # The first ``missing`` ties in index order (a running count of ties); every entry above.
    return chosen[~ties | (ties.cumsum(0) <= missing)]


def batch_topk_indices(salience: torch.Tensor, keep: int) -> torch.Tensor:
    """Flat indices of the ``keep`` largest entries of ``salience`` (any shape), in ascending order.

    Ties at the cut-off go to the lowest flat indices (row-major: the earliest rows first), so the
    selection is a function of the values alone, and a data-parallel job, whose ranks hold
    consecutive rows, selects exactly what one process selects (``global_batch_topk_indices``).

    Exact, but faster than one topk over all B*m entries: a random sample gives a cut-off that
    about 2*keep entries exceed; topk then runs over those candidates only. Falls back to the full
    topk when the cut-off is too high.
    """
    flat = salience.reshape(-1)
    total = flat.numel()
    keep = min(keep, total)
    if keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    if total < 64 * keep or total < 1 << 16:
        return _top_from_candidates(flat, None, keep)
    n_sample = 1 << 16
    generator = torch.Generator(device=flat.device).manual_seed(0)
    sample = flat[torch.randint(0, total, (n_sample,), generator=generator, device=flat.device)]
    rank = min(n_sample, int(2 * keep * n_sample / total) + 32)
    cutoff = sample.topk(rank, sorted=True).values[-1]
    candidates = _flat_nonzero(flat >= cutoff)
    if candidates.numel() < keep:
        return _top_from_candidates(flat, None, keep)
    # Every entry above the sample's cut-off is a candidate, so the ties at the true cut-off
    # (>= the sample's) are all among them.
    return _top_from_candidates(flat, candidates, keep)


def global_batch_topk_indices(salience: torch.Tensor, keep: int, ctx: "DistributedContext") -> torch.Tensor:
    """Flat indices into this rank's ``salience`` of its share of the global top ``keep`` entries.

    ``keep`` counts over all ranks' salience matrices together (k times the global batch); the ranks
    hold consecutive slices of the global batch in rank order. Each rank offers its local top
    ``keep`` (a superset of its share, ties broken by lowest index as ``batch_topk_indices``
    breaks them), all ranks all-gather those candidates and find the same cut-off; ties at the
    cut-off go to ranks in rank order, and within a rank in index order: the lowest global flat
    indices, as in one process. So the selection is exactly the one a single process makes over
    the whole batch.
    """
    if not ctx.is_distributed:
        return batch_topk_indices(salience, keep)
    flat = salience.reshape(-1)
    local_keep = min(keep, flat.numel())
    local_index = batch_topk_indices(salience, local_keep)  # ascending
    local_values = flat.index_select(0, local_index)
    padded = torch.full((keep,), float("-inf"), dtype=flat.dtype, device=flat.device)
    padded[:local_keep] = local_values
    candidates = ctx.all_gather(padded)  # (W, keep)
    cutoff = candidates.reshape(-1).topk(keep, sorted=False).values.min()
    above = (candidates > cutoff).sum(dim=1)
    ties = (candidates == cutoff).sum(dim=1)
    # Ties at the cut-off: as many as are still missing, taken in rank order, then index order (a rank
    # whose candidates miss some of its ties offered keep entries at least the cut-off: enough).
    missing = keep - int(above.sum())
    before = int(ties[: ctx.rank].sum())
    my_ties = max(0, min(int(ties[ctx.rank]), missing - before))
    keep_mask = local_values > cutoff
    if my_ties:
        tie_positions = (local_values == cutoff).nonzero().squeeze(1)[:my_ties]  # lowest indices first
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
    (salience / weight) get a sparse gradient path to ``W_enc_flat`` (in_dim, m; fastest as the
    transposed view of an (m, in_dim) tensor, ``CrossCoder.encoder_matrix``) and ``b_enc``.
    Pairs whose salience is not positive are dropped (ReLU has no gradient there and they
    contribute nothing).
    """
    batch_size, dict_size = salience.shape
    flat_index, _ = _sorted_indices(flat_index)
    kept = salience.reshape(-1).index_select(0, flat_index)
    positive = kept > 0
    if not bool(positive.all()):
        flat_index, kept = flat_index[positive], kept[positive]
    rows = torch.div(flat_index, dict_size, rounding_mode="floor")
    latents = flat_index - rows * dict_size
    values = kept / weights.index_select(0, latents)
    by_latent = _LatentOrderCache(rows, latents, dict_size)
    values = _GatheredEncoder.apply(W_enc_flat, b_enc, x_flat, latents, values, by_latent)
    return ActiveLatents(rows, latents, values, batch_size, dict_size, by_latent)


def sparse_decode(active: ActiveLatents, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j f_ij W_dec[l, j] for each model l, without bias: (B, num_models, d). ``W_dec`` (n, m, d) is
    read as one (m, n d) table: a view for a latent-major decoder (``CrossCoder.W_dec``), a copy otherwise."""
    by_latent = active.by_latent or _LatentOrderCache(active.rows, active.latents, active.dict_size)
    n, m, d = W_dec.shape
    table = W_dec.permute(1, 0, 2).reshape(m, n * d)
    out = _SparseDecoder.apply(table, active.values, active.rows, active.latents, active.offsets(), by_latent)
    return out.reshape(-1, n, d)
