"""BatchTopK crosscoder trainer, a dictionary_learning ``SAETrainer``.

``dictionary_learning.training.trainSAE`` runs it unchanged; ``mneme_plugin.crosscoder.training``
wraps it with checkpoints, resume, progress and metrics.

The step is written once for one process and for data-parallel ranks: every quantity that spans
the batch (the BatchTopK selection, the aux-k normaliser, the decoder-bias initialisation, the
dead-latent counters, the threshold, the reported figures) goes through ``self.dist``, whose
collectives are the identity in one process (``crosscoder/distributed.py`` gives it a process
group and documents the semantics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from dictionary_learning.trainers.trainer import SAETrainer

from mneme_plugin.crosscoder.base import PUBLIC_LAYOUTS
from mneme_plugin.crosscoder.config import CrossCoderConfig, TrainingConfig
from mneme_plugin.crosscoder.losses import RECONSTRUCTION_LOSSES, squared_error
from mneme_plugin.crosscoder.model import BatchTopKCrossCoder
from mneme_plugin.crosscoder.sparse import ActiveLatents, gather_active, global_batch_topk_indices, sparse_decode
from mneme_plugin.devices import resolve_device
from mneme_plugin.distributed import SINGLE_PROCESS, DistributedContext
from mneme_plugin.errors import ConfigError

# The layout of the weights' Adam moments in ``state_dict``: that of ``CrossCoder.W_enc_by_latent`` and
# ``W_dec_by_latent`` (m, n, d). Checkpoints without it hold them as W_enc (n, d, m) and W_dec (n, m, d) and are
# converted on load.
WEIGHT_LAYOUT = "latent_major"


@dataclass
class _StepOutput:
    loss: torch.Tensor
    mse: torch.Tensor
    aux: torch.Tensor
    x_norm: torch.Tensor
    x_hat: torch.Tensor
    active: ActiveLatents
    salience: torch.Tensor
    rows: int  # rows of the global batch (this rank's and the other ranks' together)


@dataclass
class StepLosses:
    loss: float
    mse_loss: float
    aux_loss: float
    l0: float
    dead_fraction: float
    explained_variance: float


def lr_multiplier(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warmup to 1, constant, then linear decay to 0 over the last ``decay_fraction``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = int(steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (steps - step) / max(1, steps - decay_start))
    return 1.0


@torch.no_grad()
def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm over the first dimension."""
    guess = points.mean(dim=0)
    for _ in range(iterations):
        dist = (points - guess).flatten(1).norm(dim=1).clamp_min(eps)
        weights = 1.0 / dist
        new = (weights.view(-1, *[1] * (points.ndim - 1)) * points).sum(0) / weights.sum()
        if (new - guess).norm() < eps * max(1.0, guess.norm().item()):
            return new
        guess = new
    return guess


class BatchTopKCrossCoderTrainer(SAETrainer):
    """Trains a ``BatchTopKCrossCoder`` on raw stacked activations (B, 2, d).

    Keyword arguments follow dictionary_learning's trainers so ``trainSAE`` can build it from a
    config dict: ``{"trainer": BatchTopKCrossCoderTrainer, "steps": ..., "activation_dim": ...,
    "dict_size": ..., "k": ..., ...}``.
    """

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        k: int = 100,
        lr: float | None = None,
        warmup_steps: int | None = None,
        decay_fraction: float = 0.2,
        loss: str = TrainingConfig.loss,
        aux_alpha: float = 1 / 32,
        dead_after_tokens: int | None = None,
        threshold_start_step: int | None = None,
        threshold_beta: float = 0.999,
        k_anneal_factor: float = TrainingConfig.k_anneal_factor,
        decoder_init_norm: float = TrainingConfig.decoder_init_norm,
        grad_clip: float = 1.0,
        adam_beta2: float = TrainingConfig.adam_beta2,
        salience: str = CrossCoderConfig.salience,
        batch_size: int = TrainingConfig.batch_size,
        expansion_factor: int | None = None,
        activation_scale: list[float] | None = None,
        seed: int | None = None,
        device: str | None = None,
        layer: int | None = None,
        lm_name: str | None = None,
        wandb_name: str = "BatchTopKCrossCoder",
        submodule_name: str | None = None,
        metadata: dict[str, Any] | None = None,
        autocast: str = TrainingConfig.autocast,
        tf32: bool = TrainingConfig.tf32,
    ) -> None:
        super().__init__(seed)
        self.crosscoder_config = CrossCoderConfig(
            activation_dim=activation_dim,
            dict_size=dict_size,
            # The factor the dictionary was sized by (config.json reports it); dict_size is what counts.
            expansion_factor=expansion_factor or max(1, dict_size // activation_dim),
            k=k,
            salience=salience,
            metadata=dict(metadata or {}),
        )
        self.training_config = TrainingConfig(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup_steps,
            decay_fraction=decay_fraction,
            loss=loss,
            aux_alpha=aux_alpha,
            dead_after_tokens=dead_after_tokens,
            threshold_start_step=threshold_start_step,
            threshold_beta=threshold_beta,
            k_anneal_factor=k_anneal_factor,
            decoder_init_norm=decoder_init_norm,
            grad_clip=grad_clip,
            adam_beta2=adam_beta2,
            seed=0 if seed is None else seed,
            autocast=autocast,
            tf32=tf32,
        ).resolve(dict_size)
        self.layer, self.lm_name, self.wandb_name, self.submodule_name = layer, lm_name, wandb_name, submodule_name
        # The data-parallel group this trainer's batches are slices of (one process: no group).
        self.dist: DistributedContext = SINGLE_PROCESS
        self.device = resolve_device(device or "auto")
        self.autocast_dtype = self.training_config.autocast_dtype(self.device.type)
        if self.device.type == "cuda":
            # A process-wide switch: fp32 matmuls (evaluation, an autocast-off step) on tensor cores.
            torch.backends.cuda.matmul.allow_tf32 = tf32
        generator = torch.Generator().manual_seed(self.training_config.seed)
        self.ae = BatchTopKCrossCoder(self.crosscoder_config)
        self.ae.reset_parameters(generator=generator, dec_norm=self.training_config.decoder_init_norm)
        if activation_scale is not None:
            self.ae.set_activation_scale(activation_scale)
        self.ae.to(self.device)
        cfg = self.training_config
        self.optimizer = torch.optim.Adam(self.ae.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.steps, cfg.warmup_steps, cfg.decay_fraction)
        )
        self.tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=self.device)
        self.steps_done = 0
        self.current_k = self.k_at(0)
        self._batch_rows = 0  # rows of the global batch of the step under way (``_forward``)
        self.last_losses: StepLosses | None = None
        self.logging_parameters = ["dead_fraction"]

    @classmethod
    def from_configs(
        cls,
        crosscoder: CrossCoderConfig,
        training: TrainingConfig,
        activation_scale: list[float] | None = None,
        device: str | None = None,
    ) -> "BatchTopKCrossCoderTrainer":
        problem = crosscoder.training_problem()
        if problem:
            raise ConfigError(problem)
        t = training
        return cls(
            steps=t.steps,
            activation_dim=crosscoder.activation_dim,
            dict_size=crosscoder.dict_size,
            expansion_factor=crosscoder.expansion_factor,
            batch_size=t.batch_size,
            k=crosscoder.k,
            lr=t.lr,
            warmup_steps=t.warmup_steps,
            decay_fraction=t.decay_fraction,
            loss=t.loss,
            aux_alpha=t.aux_alpha,
            dead_after_tokens=t.dead_after_tokens,
            threshold_start_step=t.threshold_start_step,
            threshold_beta=t.threshold_beta,
            k_anneal_factor=t.k_anneal_factor,
            decoder_init_norm=t.decoder_init_norm,
            grad_clip=t.grad_clip,
            adam_beta2=t.adam_beta2,
            salience=crosscoder.salience,
            activation_scale=activation_scale,
            seed=t.seed,
            device=device,
            metadata=crosscoder.metadata,
            autocast=t.autocast,
            tf32=t.tf32,
        )

    # ------------------------------------------------------------------------- state

    def k_at(self, step: int) -> float:
        """Latents kept per row by BatchTopK at ``step``: k_anneal_factor * k at step 0, linearly down
        to k at threshold_start_step (so the inference threshold is estimated at k)."""
        k, cfg = self.crosscoder_config.k, self.training_config
        end = cfg.threshold_start_step
        if cfg.k_anneal_factor == 1.0 or step >= end:
            return float(k)
        return k * (cfg.k_anneal_factor - (cfg.k_anneal_factor - 1.0) * step / end)

    @property
    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.training_config.dead_after_tokens

    @property
    def dead_fraction(self) -> float:
        return float(self.dead_mask.float().mean())

    @property
    def config(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "trainer_class": type(self).__name__,
            "dict_class": type(self.ae).__name__,
            "activation_dim": self.crosscoder_config.activation_dim,
            "dict_size": self.crosscoder_config.dict_size,
            "k": self.crosscoder_config.k,
            "salience": self.crosscoder_config.salience,
            **{k: v for k, v in self.training_config.to_dict().items() if k not in ("device",)},
            "activation_scale": self.ae.activation_scale.tolist(),
            "layer": self.layer,
            "lm_name": self.lm_name,
            "wandb_name": self.wandb_name,
            "submodule_name": self.submodule_name,
            # The crosscoder's metadata (models, hook, context length): a trainSAE output loads back with it.
            "metadata": dict(self.crosscoder_config.metadata),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit: weights, optimizer, schedule, counters."""
        return {
            "ae": self.ae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "steps_done": self.steps_done,
            "weight_layout": WEIGHT_LAYOUT,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.load_state_dict(state["ae"])
        optimizer = state["optimizer"]
        if state.get("weight_layout") != WEIGHT_LAYOUT:
            optimizer = self._moments_latent_major(optimizer)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"].to(self.device))
        self.steps_done = int(state["steps_done"])

    def _moments_latent_major(self, optimizer: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of an earlier version holds the weights' Adam moments in the public layouts, W_enc (n, d, m)
        and W_dec (n, m, d); the parameters are now stored latent-major (``PUBLIC_LAYOUTS``)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = dict(optimizer["state"])
        for public, (stored, _, to_stored) in PUBLIC_LAYOUTS.items():
            index = next(i for i, p in enumerate(params) if p is getattr(self.ae, stored))
            public_shape = tuple(getattr(self.ae, public).shape)
            if state.get(index):
                state[index] = {name: value.permute(to_stored).contiguous()
                                if isinstance(value, torch.Tensor) and tuple(value.shape) == public_shape else value
                                for name, value in state[index].items()}
        return {**optimizer, "state": state}

    # ------------------------------------------------------------------------- loss

    def _aux_loss(
        self, x_norm: torch.Tensor, x_hat: torch.Tensor, salience: torch.Tensor, weights: torch.Tensor,
        rows: int | None = None,
    ) -> torch.Tensor:
        """Aux-k loss: dead latents learn to explain the residual (normalised by its variance)."""
        dead = self.dead_mask
        n_dead = int(dead.sum())
        if n_dead == 0 or self.training_config.aux_alpha == 0:
            return x_norm.new_zeros(())
        k_aux = min(self.crosscoder_config.activation_dim // 2, n_dead)
        with torch.no_grad():
            masked = torch.where(dead[None, :], salience, torch.full_like(salience, -1.0))
            top = masked.topk(k_aux, dim=1, sorted=False).indices  # (B, k_aux)
            batch, dict_size = salience.shape
            row_start = torch.arange(batch, device=salience.device)[:, None] * dict_size
            flat_index = (top + row_start).reshape(-1)
            residual = (x_norm - x_hat).detach()
            # Variance of the global batch's residual (before any early return: every rank joins).
            global_batch = batch * self.dist.world_size if rows is None else rows
            mean = self.dist.all_sum(residual.sum(dim=0)) / global_batch
            denom = self.dist.all_sum((residual - mean).pow(2).sum()) / global_batch
        x_flat = x_norm.reshape(x_norm.shape[0], -1)
        active = gather_active(self.ae.encoder_matrix(), self.ae.b_enc, x_flat, salience, weights, flat_index)
        if active.values.numel() == 0:
            return x_norm.new_zeros(())
        aux_hat = sparse_decode(active, self.ae.W_dec)
        err = (residual - aux_hat).pow(2).sum(dim=(1, 2)).mean()
        return err / denom.clamp_min(1e-12)

    def reconstruction_losses(self, x_norm: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared error, the loss minimised): the squared error is reported whatever the loss."""
        mse = squared_error(x_norm, x_hat)
        kind = self.training_config.loss
        return mse, mse if kind == "squared" else RECONSTRUCTION_LOSSES[kind](x_norm, x_hat)

    def _forward(self, x: torch.Tensor) -> _StepOutput:
        """The reconstruction loss (``TrainingConfig.loss``) + alpha * aux-k (means over this rank's rows)."""
        x_norm = self.ae.normalize(x.to(self.device))
        self._batch_rows = self.global_rows(x_norm)
        active, salience, weights = self.ae.batch_topk_active(x_norm, self._select_global)
        x_hat = self.ae.decode_active(active)
        mse, loss = self.reconstruction_losses(x_norm, x_hat)
        aux = self._aux_loss(x_norm, x_hat, salience, weights, self._batch_rows)
        loss = loss + self.training_config.aux_alpha * aux
        return _StepOutput(loss, mse, aux, x_norm, x_hat, active, salience, self._batch_rows)

    def global_rows(self, x: torch.Tensor) -> int:
        """Rows of the global batch ``x`` is this rank's share of. Ranks' shares may differ by a row or
        more (a store's held-out rows leave global batches short of batch_size): one all-reduce."""
        if not self.dist.is_distributed:
            return x.shape[0]
        return int(self.dist.all_sum(torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)).item())

    def _select_global(self, salience: torch.Tensor, keep: int) -> torch.Tensor:
        """BatchTopK over the global batch: the step's k (``k_at``) x the global batch's rows (``keep``,
        k x this rank's rows, is the crosscoder's own budget for one process). A fractional k is rounded
        once over the global batch, as one process rounds it (not per rank)."""
        rows, k = self._batch_rows, self.crosscoder_config.k
        budget = k * rows if self.current_k == k else min(rows * salience.shape[1], round(self.current_k * rows))
        return global_batch_topk_indices(salience, budget, self.dist)

    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False, **_: Any):
        """The training loss of a raw batch (dictionary_learning's trainer interface)."""
        out = self._forward(x)
        if not logging:
            return out.loss
        losslog = {"loss": out.loss.item(), "mse_loss": out.mse.item(), "aux_loss": out.aux.item()}
        return out.x_norm, out.x_hat.detach(), out.active.to_dense(), losslog

    # ------------------------------------------------------------------------- update

    def update(self, step: int, activations: torch.Tensor) -> float:
        """One optimisation step on a raw batch (B, 2, d) (this rank's slice of it); returns the loss."""
        if activations.ndim != 3 or activations.shape[1] != 2:
            raise ValueError(f"Expected a batch of shape (B, 2, d), got {tuple(activations.shape)}.")
        cfg = self.training_config
        self.current_k = self.k_at(step)
        if step == 0 and self.steps_done == 0:
            with torch.no_grad():
                whole = self.dist.all_gather_rows(self.ae.normalize(activations.to(self.device)))
                self.ae.b_dec.copy_(geometric_median(whole))
        # Forward under autocast (weights and Adam stay fp32); backward outside it, as torch advises.
        with torch.autocast(self.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = self._forward(activations)
        self.optimizer.zero_grad(set_to_none=True)
        # Gradients are averaged over ranks (DDP); a rank's loss is a mean over its rows, so shares of
        # unequal size weigh in by their rows: the gradient of the global batch's mean, as one process.
        local, world = activations.shape[0], self.dist.world_size
        loss = out.loss if local * world == out.rows else out.loss * (local * world / out.rows)
        loss.backward()
        self.reduce_gradients()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.ae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self._update_counters(step, out.active, out.salience, out.rows)
            self.last_losses = self._step_losses(out, local)
        self.steps_done += 1
        return self.last_losses.loss

    def reduce_gradients(self) -> None:
        """Between backward and the optimiser step. One process: the gradients are the batch's
        already; the data-parallel trainer's DDP averages them over ranks during backward."""

    def _step_losses(self, out: _StepOutput, local_batch: int) -> StepLosses:
        """The global batch's figures for the progress bar: one all-reduce of a few sums."""
        x_norm, x_hat, world = out.x_norm, out.x_hat, self.dist.world_size
        share = 1 / world if local_batch * world == out.rows else local_batch / out.rows  # of the global means
        sums = torch.cat([
            torch.stack([out.loss.detach(), out.mse.detach(), out.aux.detach()]).double() * share,
            torch.stack([torch.tensor(float(out.active.values.numel()), device=x_norm.device),
                         (x_norm - x_hat).pow(2).sum(), x_norm.pow(2).sum()]).double(),
            x_norm.sum(dim=0).reshape(-1).double(),
        ])
        sums = self.dist.all_sum(sums).tolist()
        global_batch = out.rows
        total = sums[5] - sum(v * v for v in sums[6:]) / global_batch
        return StepLosses(
            loss=sums[0], mse_loss=sums[1], aux_loss=sums[2], l0=sums[3] / global_batch,
            dead_fraction=self.dead_fraction, explained_variance=1.0 - sums[4] / max(total, 1e-12),
        )

    def _update_counters(self, step: int, active: ActiveLatents, salience: torch.Tensor, global_batch: int) -> None:
        """A latent fired if it fired on any rank (every latent ages by the global batch's rows); the
        threshold EMA follows the smallest kept salience over all ranks. Both stay identical on every rank."""
        fired = torch.zeros(self.ae.dict_size, dtype=torch.int32, device=self.device)
        fired[active.latents] = 1
        fired = self.dist.all_max(fired).bool()
        self.tokens_since_fired += global_batch
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
