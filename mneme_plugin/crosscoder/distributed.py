"""Data-parallel BatchTopK training: every rank holds a slice of one global batch.

Semantics (the same crosscoder as one process on the same global batch, up to float summation
order):

* Batch: step s's global batch is the one a single process would draw; rank r holds its rows
  [r*B/W, (r+1)*B/W) (``batch_size`` must be a multiple of the world size W).
* BatchTopK is global-exact: each rank takes its local top k*B (never fewer than it contributes to
  the global top k*B), all ranks all-gather those candidate saliences (W*k*B floats), every rank
  finds the same global cut-off (the k*B-th largest) and keeps its own entries above it; ties at
  the cut-off go to ranks in rank order. The local candidates are a superset of what is needed, so
  the selection is exactly one process's selection.
* Losses are means over the local rows; gradients are averaged over ranks (one coalesced
  all-reduce after backward), which is the gradient of the global mean. The aux-k loss is
  normalised by the variance of the global residual (all-reduced sums).
* The decoder bias is initialised from the geometric median of the whole first global batch
  (all-gathered once).
* Dead-latent counters: a latent fired in the step if it fired on any rank (all-reduce MAX of the
  fired mask); every rank adds the global batch size. The threshold EMA uses the smallest kept
  salience over all ranks (all-reduce MIN). Both stay identical on every rank.
* Parameters and optimizer state are replicated (identical updates from identical gradients), so a
  checkpoint holds no rank-specific state and resumes with any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mneme_plugin.crosscoder.sparse import ActiveLatents, batch_topk_indices, gather_active, sparse_decode
from mneme_plugin.crosscoder.trainer import BatchTopKCrossCoderTrainer, StepLosses, _StepOutput, geometric_median
from mneme_plugin.distributed import DistributedContext, distributed_context
from mneme_plugin.errors import ConfigError


def global_batch_topk_indices(salience: torch.Tensor, keep: int, ctx: DistributedContext) -> torch.Tensor:
    """Flat indices into this rank's ``salience`` of its share of the global top ``keep`` entries.

    ``keep`` counts over all ranks' salience matrices together (k times the global batch).
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


class DistributedBatchTopKCrossCoderTrainer(BatchTopKCrossCoderTrainer):
    """``BatchTopKCrossCoderTrainer`` for one rank of a data-parallel job (see the module docstring).

    ``update(step, x)`` takes this rank's slice of the global batch. In a single process it computes
    exactly what the base trainer computes.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dist = distributed_context(str(self.device))
        # Same seed gives the same initialisation everywhere; broadcasting makes it certain.
        self.broadcast_parameters()

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Rank 0's weights and buffers on every rank (after initialisation or loading)."""
        for tensor in [*self.ae.parameters(), *self.ae.buffers(), self.tokens_since_fired]:
            self.dist.broadcast_(tensor)

    def load_state_dict(self, state) -> None:  # type: ignore[override]
        super().load_state_dict(state)
        self.broadcast_parameters()

    # ------------------------------------------------------------------------- forward

    def global_batch_size(self, local_batch: int) -> int:
        return local_batch * self.dist.world_size

    def _batch_topk_active(self, x_norm: torch.Tensor) -> tuple[ActiveLatents, torch.Tensor, torch.Tensor]:
        ae = self.ae
        if not ae.cfg.is_default_variant:
            ae.batch_topk_active(x_norm)  # raises the "imported crosscoder" error
        with torch.no_grad():
            weights = ae.salience_weights().clamp_min(torch.finfo(ae.W_dec.dtype).tiny)
            salience = ae.salience_matrix(x_norm, weights)
            keep = ae.k * self.global_batch_size(x_norm.shape[0])
            flat_index = global_batch_topk_indices(salience, keep, self.dist)
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        W_enc_flat = ae.W_enc.reshape(-1, ae.dict_size)
        active = gather_active(W_enc_flat, ae.b_enc, x_flat, salience, weights, flat_index)
        return active, salience, weights

    def _aux_loss(self, x_norm, x_hat, salience, weights):  # type: ignore[override]
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0 or self.training_config.aux_alpha == 0:
            return x_norm.new_zeros(())
        k_aux = min(self.crosscoder_config.activation_dim // 2, n_dead)
        with torch.no_grad():
            masked = torch.where(dead[None, :], salience, torch.full_like(salience, -1.0))
            top = masked.topk(k_aux, dim=1, sorted=False).indices
            batch, dict_size = salience.shape
            row_start = torch.arange(batch, device=salience.device)[:, None] * dict_size
            flat_index = (top + row_start).reshape(-1)
            residual = (x_norm - x_hat).detach()
            # Variance of the global residual: two all-reduced passes, like the one-process formula.
            global_batch = self.global_batch_size(batch)
            mean = self.dist.all_sum(residual.sum(dim=0)) / global_batch
            denom = self.dist.all_sum((residual - mean).pow(2).sum()) / global_batch
        W_enc_flat = self.ae.W_enc.reshape(-1, self.ae.dict_size)
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        active = gather_active(W_enc_flat, self.ae.b_enc, x_flat, salience, weights, flat_index)
        if active.values.numel() == 0:
            return x_norm.new_zeros(())
        aux_hat = sparse_decode(active, self.ae.W_dec)
        err = (residual - aux_hat).pow(2).sum(dim=(1, 2)).mean()
        return err / denom.clamp_min(1e-12)

    def _forward(self, x: torch.Tensor) -> _StepOutput:
        x_norm = self.ae.normalize(x.to(self.device))
        active, salience, weights = self._batch_topk_active(x_norm)
        x_hat = self.ae.decode_active(active)
        mse, loss = self.reconstruction_losses(x_norm, x_hat)
        aux = self._aux_loss(x_norm, x_hat, salience, weights)
        loss = loss + self.training_config.aux_alpha * aux
        return _StepOutput(loss, mse, aux, x_norm, x_hat, active, salience)

    # ------------------------------------------------------------------------- update

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Mean of every rank's gradients, as one coalesced all-reduce."""
        if not self.dist.is_distributed:
            return
        params = list(self.ae.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_sum(flat).div_(self.dist.world_size)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def update(self, step: int, activations: torch.Tensor) -> float:
        if activations.ndim != 3 or activations.shape[1] != 2:
            raise ValueError(f"Expected a batch of shape (B, 2, d), got {tuple(activations.shape)}.")
        cfg = self.training_config
        local_batch = activations.shape[0]
        if step == 0 and self.steps_done == 0:
            with torch.no_grad():
                whole = self.dist.all_gather(self.ae.normalize(activations.to(self.device)))
                self.ae.b_dec.copy_(geometric_median(whole.reshape(-1, *whole.shape[2:])))
        out = self._forward(activations)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.average_gradients()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.ae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self._update_counters(step, out.active, out.salience, local_batch)
            x_norm, x_hat = out.x_norm, out.x_hat
            # Figures of the global batch for the progress bar: one all-reduce of a few sums.
            means = torch.stack([out.loss.detach(), out.mse.detach(), out.aux.detach()]).double()
            sums = torch.cat([
                means / self.dist.world_size,
                torch.stack([torch.tensor(float(out.active.values.numel()), device=x_norm.device),
                             (x_norm - x_hat).pow(2).sum(), x_norm.pow(2).sum()]).double(),
                x_norm.sum(dim=0).reshape(-1).double(),
            ])
            sums = self.dist.all_sum(sums)
            global_batch = self.global_batch_size(local_batch)
            total = float(sums[5]) - float(sums[6:].pow(2).sum()) / global_batch
        self.steps_done += 1
        self.last_losses = StepLosses(
            loss=float(sums[0]), mse_loss=float(sums[1]), aux_loss=float(sums[2]),
            l0=float(sums[3]) / global_batch, dead_fraction=self.dead_fraction,
            explained_variance=1.0 - float(sums[4]) / max(total, 1e-12),
        )
        return self.last_losses.loss

    def _update_counters(self, step: int, active: ActiveLatents, salience: torch.Tensor, batch_size: int) -> None:
        fired = torch.zeros(self.ae.dict_size, dtype=torch.int32, device=self.device)
        fired[active.latents] = 1
        fired = self.dist.all_max(fired).bool()
        self.tokens_since_fired += self.global_batch_size(batch_size)
        self.tokens_since_fired[fired] = 0
        cfg = self.training_config
        if step >= cfg.threshold_start_step:
            kept = salience[active.rows, active.latents]
            kept = kept[kept > 0]
            smallest = kept.min().float() if kept.numel() else torch.tensor(float("inf"), device=self.device)
            smallest = self.dist.all_min(smallest.reshape(1))[0]
            if torch.isfinite(smallest):
                threshold = self.ae.threshold
                if threshold < 0:
                    threshold.copy_(smallest)
                else:
                    threshold.mul_(cfg.threshold_beta).add_((1 - cfg.threshold_beta) * smallest)


def check_divisible(batch_size: int, ctx: DistributedContext) -> None:
    if batch_size % ctx.world_size:
        raise ConfigError(
            f"training.batch_size={batch_size} is the global batch; it must be a multiple of the "
            f"number of ranks ({ctx.world_size}). Use a batch size divisible by {ctx.world_size}."
        )


def rank_slices(batches: Iterator[torch.Tensor], ctx: DistributedContext) -> Iterator[torch.Tensor]:
    """This rank's rows of each global batch of an iterable that every rank reads whole."""
    for batch in batches:
        check_divisible(batch.shape[0], ctx)
        local = batch.shape[0] // ctx.world_size
        yield batch[ctx.rank * local : (ctx.rank + 1) * local]
