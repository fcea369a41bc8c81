"""Configs of the crosscoder and of its training run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mneme_plugin.devices import check_device_name
from mneme_plugin.config import ConfigMixin, Seed, require
from mneme_plugin.errors import ConfigError
from mneme_plugin.crosscoder.losses import RECONSTRUCTION_LOSSES
from mneme_plugin.crosscoder.normalizers import NORMALIZERS
from mneme_plugin.crosscoder.salience import SALIENCE_MODES

DTYPES = ("float32", "bfloat16", "float16", "float64")
# Mixed precision of the training step (``TrainingConfig.autocast``): ``auto`` is bfloat16 on CUDA
# (the encoder matmul, the step's dense FLOPs, in bf16 with fp32 weights and Adam) and off elsewhere.
AUTOCAST_MODES = ("auto", "off", "bfloat16")
# Sparsity rules: BatchTopK / threshold (trained here), plain ReLU (L1 crosscoders: Kissane, the
# science-of-finetuning ``CrossCoder``), per-latent JumpReLU thresholds (imported SAE-Lens exports).
SPARSITY_MODES = ("batchtopk", "relu", "jumprelu")
# Input normalisations (``normalizers.NORMALIZERS``): ``scale`` x * s_l (ours, Kissane); ``mean_scale``
# (x - mu_l) * s_l, undone as y / (s_l + 1e-8) + mu_l (the science-of-finetuning normaliser).
NORMALIZATIONS = tuple(NORMALIZERS)
# science-of-finetuning DECOUPLED code normalisation: one weight, top-k and threshold per model.
DECOUPLED = "decoupled"


@dataclass
class CrossCoderConfig(ConfigMixin):
    """Shape and encoding rule of a BatchTopK crosscoder over two models.

    ``salience`` picks the decoder-norm weight w_j used to rank latents in BatchTopK:
    ``paper`` (||D_j^b||^2 + ||D_j^f||^2, the MNEME paper's), ``crosscoder``
    (||D_j^b|| + ||D_j^f||), ``sae`` (sqrt of the sum of squares), ``mixed`` and ``none``
    (the other science-of-finetuning modes, for imported crosscoders); ``decoupled`` (imported
    science-of-finetuning DECOUPLED crosscoders: per-model weights ||D_j^l||, thresholds and top-k).

    ``sparsity`` and ``normalization`` describe imported crosscoders (see ``mneme_plugin.formats``);
    the defaults (``batchtopk``, ``scale``) are the ones this package trains.
    """

    # None = taken from the activations (d_model) / from expansion_factor * activation_dim.
    activation_dim: int | None = None
    dict_size: int | None = None
    expansion_factor: int = 32
    k: int = 100
    salience: str = "crosscoder"
    num_models: int = 2
    dtype: str = "float32"
    sparsity: str = "batchtopk"
    normalization: str = "scale"
    # Free metadata carried with the weights: models, layer, hook, store it was trained on.
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(
            self.activation_dim is None or self.activation_dim > 0,
            f"activation_dim must be positive, got {self.activation_dim}.",
        )
        require(self.dict_size is None or self.dict_size > 0, f"dict_size must be positive, got {self.dict_size}.")
        require(self.expansion_factor > 0, f"expansion_factor must be positive, got {self.expansion_factor}.")
        require(self.k > 0, f"k must be positive, got {self.k}.")
        require(
            self.dict_size is None or self.k <= self.dict_size,
            f"k must be at most dict_size={self.dict_size}, got {self.k}.",
        )
        require(
            self.salience in SALIENCE_MODES or self.salience == DECOUPLED,
            f"salience must be one of {sorted(SALIENCE_MODES) + [DECOUPLED]}, got {self.salience!r}.",
        )
        require(self.sparsity in SPARSITY_MODES, f"sparsity must be one of {SPARSITY_MODES}, got {self.sparsity!r}.")
        require(
            self.normalization in NORMALIZATIONS,
            f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}.",
        )
        require(
            self.salience != DECOUPLED or self.sparsity == "batchtopk",
            "salience 'decoupled' needs sparsity 'batchtopk'.",
        )
        require(self.num_models == 2, f"num_models must be 2 (base, edited), got {self.num_models}.")
        require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}.")

    @property
    def is_default_variant(self) -> bool:
        """True for the crosscoders this package trains (no imported-format extension in use)."""
        return self.sparsity == "batchtopk" and self.normalization == "scale" and self.salience != DECOUPLED

    def training_problem(self, section: str = "crosscoder") -> str | None:
        """Why a crosscoder of this config cannot be trained here (None if it can): ``dtype``, ``sparsity``,
        ``normalization`` and the ``decoupled`` salience describe imported crosscoders; the trainer trains
        float32 BatchTopK crosscoders on scaled inputs, and would ignore the others without a word."""
        asked = {name: getattr(self, name) for name, default in (("dtype", "float32"), ("sparsity", "batchtopk"),
                                                                 ("normalization", "scale")) if getattr(self, name) != default}
        if self.salience == DECOUPLED:
            asked["salience"] = DECOUPLED
        if not asked:
            return None
        return (f"{', '.join(f'{section}.{k}: {v}' for k, v in asked.items())}: these describe imported crosscoders; "
                "the trainer trains float32 BatchTopK crosscoders on scaled activations (salience "
                f"{sorted(SALIENCE_MODES)}). Leave them out; to compute in bfloat16, set training.autocast.")

    @property
    def is_resolved(self) -> bool:
        return self.activation_dim is not None and self.dict_size is not None

    @property
    def parameter_count(self) -> int:
        """The crosscoder's parameters (encoder and decoder of both models, their biases); resolved configs only."""
        if self.activation_dim is None or self.dict_size is None:
            raise ConfigError("parameter_count needs a resolved config (CrossCoderConfig.resolve(d_model)).")
        d, m = self.activation_dim, self.dict_size
        return 2 * (2 * d * m) + m + 2 * d

    def resolve(self, activation_dim: int) -> "CrossCoderConfig":
        """A copy with activation_dim and dict_size filled in for activations of width ``activation_dim``."""
        if self.activation_dim is not None and self.activation_dim != activation_dim:
            raise ConfigError(
                f"The crosscoder config says activation_dim={self.activation_dim}, but the activations have "
                f"d_model={activation_dim}; drop activation_dim from the config or use matching activations."
            )
        if self.dict_size is None:
            return self.replace(activation_dim=activation_dim, dict_size=self.expansion_factor * activation_dim)
        # An explicit dict_size wins; the factor then reports what it amounts to.
        return self.replace(activation_dim=activation_dim, expansion_factor=max(1, self.dict_size // activation_dim))


# The BatchTopK paper's learning-rate scaling (Bussmann et al. 2024, Fig. 3; the science-of-finetuning
# trainer's default): 2e-4 at 2^14 latents, times 1 / sqrt(dict_size / 2^14).
REFERENCE_LR, REFERENCE_DICT_SIZE = 2e-4, 2**14
# Runs shorter than this get SHORT_RUN_STEPS / steps times that rate, at most SHORT_RUN_MAX_BOOST: the
# paper's rate is for long runs, and a short run at it ends under-trained; scaled so that the run's
# Adam steps add up to what SHORT_RUN_STEPS steps at the paper's rate would (README "Crosscoder
# quality": at 1,500 steps, m=256 and 512, it recovers more planted features with either salience
# than the earlier sqrt(5000 / steps) boost, most with the paper's).
SHORT_RUN_STEPS, SHORT_RUN_MAX_BOOST = 5000, 4.0
# Published schedule constants, reached by runs long enough to afford them.
PUBLISHED_WARMUP_STEPS, PUBLISHED_THRESHOLD_START, PUBLISHED_DEAD_AFTER = 1000, 1000, 10_000_000


def default_lr(dict_size: int, steps: int | None = None) -> float:
    """The learning rate for a dictionary of ``dict_size`` latents: 2e-4 / sqrt(dict_size / 2^14),
    times min(4, 5000 / steps) for a run of under 5,000 ``steps``."""
    lr = REFERENCE_LR / math.sqrt(dict_size / REFERENCE_DICT_SIZE)
    if steps is not None and steps < SHORT_RUN_STEPS:
        lr *= min(SHORT_RUN_MAX_BOOST, SHORT_RUN_STEPS / max(1, steps))
    return lr


@dataclass
class TrainingConfig(ConfigMixin):
    """Optimisation of a crosscoder: schedule, auxiliary loss, threshold, checkpoints.

    Defaults follow the published BatchTopK crosscoders (aux-k with alpha 1/32, threshold EMA with beta
    0.999, gradient clipping at 1.0) except the loss (``norm_1.25``) and Adam's beta2 (0.95, not 0.999). Fields left at None scale with
    the run (``resolve``), so a short run gets a schedule that fits it:

    - ``lr``: 2e-4 / sqrt(dict_size / 2^14) (the BatchTopK paper's scaling with dictionary size),
      times min(4, 5000 / steps) for runs of under 5,000 steps (``default_lr``);
    - ``warmup_steps``: min(1000, steps // 10);
    - ``threshold_start_step``: min(1000, steps // 2) (the inference threshold is estimated after it);
    - ``dead_after_tokens``: min(10M, steps * batch_size // 10): a latent that has not fired for a
      tenth of the run is dead and gets the aux-k gradient (10M tokens, the published window, would
      never be reached by a run of under 10M tokens, so no latent would ever be revived).
    """

    runtime_fields = ("device", "checkpoint_every", "keep_checkpoints", "keep_finished_checkpoints")
    later_fields = ("decoder_init_norm",)

    steps: int = 10_000
    batch_size: int = 4096
    lr: float | None = None
    warmup_steps: int | None = None
    # Linear decay to zero over the last fraction of steps (0 disables the decay).
    decay_fraction: float = 0.2
    # Reconstruction loss (``losses.RECONSTRUCTION_LOSSES``): ``norm_1.25`` (the default: the mean over rows
    # and models of the error norm to the power 1.25), ``norm`` (the science-of-finetuning trainer's mean
    # error norm: it leaks least between the models' decoders) or ``squared`` (the paper's Eq. 1). The norm
    # losses recover more planted features than the squared one, with either salience, and need no
    # gradient clipping; the power 1.25 explains more variance than the plain norm (README "Crosscoder quality").
    loss: str = "norm_1.25"
    aux_alpha: float = 1 / 32
    dead_after_tokens: int | None = None
    threshold_start_step: int | None = None
    threshold_beta: float = 0.999
    # BatchTopK keeps k_anneal_factor * k latents per row at step 0, linearly down to k at
    # threshold_start_step (1 disables; the science-of-finetuning trainer's k_max / k_annealing_steps).
    k_anneal_factor: float = 1.0
    # Initial norm of every decoder row, per model (the encoder starts as the decoder's transpose): the
    # science-of-finetuning trainer's ``norm_init_scale``, 1 there and here. Its best value depends on
    # the data and the salience (README "Crosscoder quality"), so it stays at the published value.
    decoder_init_norm: float = 1.0
    grad_clip: float = 1.0
    # Adam's second-moment decay (beta1 stays 0.9): 0.95 (the default) forgets old gradient scales sooner
    # than the published trainers' 0.999 and explains more variance in short runs (README "Crosscoder quality").
    adam_beta2: float = 0.95
    seed: Seed = 0
    device: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    # The checkpoints serve resuming only (weights plus Adam's moments: 3x the crosscoder's bytes each), so
    # they are removed once the crosscoder and its metrics are written; true keeps them (the crosscoder
    # mid-run, loadable by `load_crosscoder`).
    keep_finished_checkpoints: bool = False
    # Rows held out of training to report quality on (metrics.json): with an activation store, the last
    # rows of every shard (whole contexts, never seen by the optimiser); with a stream, the batches
    # that follow the training ones.
    eval_rows: int = 8192
    # `mneme run` only: train from a harvest stream (no activation store on disk); attribution
    # then streams over the corpus too. The stream shuffles rows in a buffer of this many rows.
    stream: bool = False
    shuffle_buffer_rows: int = 262_144
    # Mixed precision (AUTOCAST_MODES) and TF32 matmuls (CUDA only: fp32 matmuls on tensor cores).
    autocast: str = "auto"
    tf32: bool = True

    def __post_init__(self) -> None:
        check_device_name(self.device)
        require(self.steps > 0, f"steps must be positive, got {self.steps}.")
        require(self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}.")
        require(self.lr is None or self.lr > 0, f"lr must be positive (or null for the default), got {self.lr}.")
        require(
            self.warmup_steps is None or self.warmup_steps >= 0,
            f"warmup_steps must be >= 0, got {self.warmup_steps}.",
        )
        require(
            0.0 <= self.decay_fraction <= 1.0,
            f"decay_fraction must be in [0, 1], got {self.decay_fraction}.",
        )
        require(
            self.loss in RECONSTRUCTION_LOSSES,
            f"loss must be one of {sorted(RECONSTRUCTION_LOSSES)}, got {self.loss!r}.",
        )
        require(self.aux_alpha >= 0, f"aux_alpha must be >= 0, got {self.aux_alpha}.")
        require(
            self.dead_after_tokens is None or self.dead_after_tokens > 0, "dead_after_tokens must be positive."
        )
        require(
            self.threshold_start_step is None or self.threshold_start_step >= 0,
            "threshold_start_step must be >= 0.",
        )
        require(0.0 <= self.threshold_beta < 1.0, "threshold_beta must be in [0, 1).")
        require(0.0 <= self.adam_beta2 < 1.0, f"adam_beta2 must be in [0, 1), got {self.adam_beta2}.")
        require(self.k_anneal_factor >= 1.0, f"k_anneal_factor must be >= 1 (1 disables), got {self.k_anneal_factor}.")
        require(self.decoder_init_norm > 0, f"decoder_init_norm must be positive, got {self.decoder_init_norm}.")
        require(self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping).")
        require(self.checkpoint_every >= 0, "checkpoint_every must be >= 0 (0 disables checkpoints).")
        require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1.")
        require(self.eval_rows >= 0, "eval_rows must be >= 0.")
        require(self.shuffle_buffer_rows >= 2 * self.batch_size,
                f"shuffle_buffer_rows ({self.shuffle_buffer_rows}) must be at least 2 x batch_size ({self.batch_size}): "
                "raise shuffle_buffer_rows (`mneme train --shuffle-buffer`) or lower batch_size (`--train-batch-size`).")
        require(self.autocast in AUTOCAST_MODES,
                f"autocast must be one of {AUTOCAST_MODES}, got {self.autocast!r}.")

    def autocast_dtype(self, device_type: str) -> "torch.dtype | None":
        """The autocast dtype of the step on ``device_type`` (None: full precision)."""
        import torch

        if self.autocast == "off":
            return None
        if self.autocast == "auto" and (device_type != "cuda" or not torch.cuda.is_bf16_supported()):
            return None
        return torch.bfloat16

    @property
    def is_resolved(self) -> bool:
        return None not in (self.lr, self.warmup_steps, self.threshold_start_step, self.dead_after_tokens)

    def resolve(self, dict_size: int) -> "TrainingConfig":
        """A copy with every None field replaced by its run-scaled default (see the class docstring)."""
        return self.replace(
            lr=self.lr if self.lr is not None else default_lr(dict_size, self.steps),
            warmup_steps=(
                self.warmup_steps if self.warmup_steps is not None else min(PUBLISHED_WARMUP_STEPS, self.steps // 10)
            ),
            threshold_start_step=(
                self.threshold_start_step
                if self.threshold_start_step is not None
                else min(PUBLISHED_THRESHOLD_START, self.steps // 2)
            ),
            dead_after_tokens=(
                self.dead_after_tokens
                if self.dead_after_tokens is not None
                else max(1, min(PUBLISHED_DEAD_AFTER, self.steps * self.batch_size // 10))
            ),
        )

    def schedule_warnings(self) -> list[str]:
        """Ways an explicitly set schedule does not fit the run length (empty when it fits)."""
        found = []
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            found.append(
                f"warmup_steps={self.warmup_steps} >= steps={self.steps}: the learning rate never reaches its "
                "value and the crosscoder is barely trained; lower warmup_steps (or leave it unset to scale "
                "with the run)."
            )
        if self.threshold_start_step is not None and self.threshold_start_step >= self.steps:
            found.append(
                f"threshold_start_step={self.threshold_start_step} >= steps={self.steps}: no inference threshold "
                "is estimated, so encoding falls back to BatchTopK over each batch; lower threshold_start_step "
                "(or leave it unset)."
            )
        if self.dead_after_tokens is not None and self.dead_after_tokens >= self.steps * self.batch_size:
            found.append(
                f"dead_after_tokens={self.dead_after_tokens} >= the run's {self.steps * self.batch_size} tokens: "
                "no latent can count as dead, so the aux-k loss never revives one (leave it unset to scale "
                "with the run)."
            )
        return found
