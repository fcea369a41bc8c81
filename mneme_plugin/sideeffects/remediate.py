"""Remediation: retrain the edited model on the corpus samples that most activate the lost latents.

The paper reports that this partly reverses the side effects. Samples are the collected top
contexts (``mneme collect``) of the most suppressed latents; training is plain next-token loss
with a small learning rate, through LoRA when ``peft`` is installed and the model is a HF model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mneme_plugin.config import ConfigMixin, Seed, require
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_write

logger = logging.getLogger("mneme_plugin")

Evaluator = Callable[[Any], Mapping[str, float]]


@dataclass
class RemediateConfig(ConfigMixin):
    """Which samples, and how the edited model is retrained on them."""

    classes: tuple[str, ...] = ("base_only", "suppressed")
    max_latents: int = 50
    samples_per_latent: int = 8
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    lora: bool = False
    lora_rank: int = 8
    seed: Seed = 0

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        require(self.max_latents >= 1 and self.samples_per_latent >= 1, "max_latents and samples_per_latent must be >= 1.")
        require(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1.")
        require(self.lr > 0, "lr must be > 0.")


@dataclass
class RemediationResult:
    model: Any
    n_samples: int
    latents: list[int]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None

    def table(self) -> pd.DataFrame:
        cats = sorted(set(self.before) | set(self.after))
        return pd.DataFrame({"category": cats, "before_remediation": [self.before.get(c) for c in cats],
                             "after_remediation": [self.after.get(c) for c in cats]})


def select_samples(contexts: Any, attribution: pd.DataFrame, config: RemediateConfig) -> tuple[torch.Tensor, list[int]]:
    """Token rows (n, ctx) of the top contexts of the most suppressed collected latents."""
    chosen = attribution[attribution["latent_class"].isin(config.classes)]
    chosen = chosen[chosen["latent"].isin(contexts.latents)]
    chosen = chosen.sort_values("score", ascending=False, kind="stable").head(config.max_latents)
    latents = chosen["latent"].astype(int).tolist()
    if not latents:
        raise ConfigError(
            f"No collected latent of class {list(config.classes)}: collect contexts for the suppressed latents first "
            "(mneme collect with classes [base_only, suppressed])."
        )
    rows: list[int] = []
    for latent in latents:
        rows += [r for r in contexts.per_latent[contexts.index_of(latent)]["top_rows"][: config.samples_per_latent]
                 if r not in rows]
    return contexts.tokens[rows], latents


def _lm_loss(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "hook_dict"):  # TransformerLens HookedTransformer / TransformerBridge
        return model(tokens, return_type="loss")
    return model(input_ids=tokens, labels=tokens).loss


def _with_lora(model: Any, config: RemediateConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        logger.warning("lora: true but peft is not installed; fine-tuning all weights instead.")
        return model
    if hasattr(model, "hook_dict"):
        logger.warning("LoRA applies to HF models; this TransformerLens model is fine-tuned in full.")
        return model
    return get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def remediate(edited: Any, samples: torch.Tensor, config: RemediateConfig | None = None,
              evaluator: Evaluator | None = None, latents: list[int] | None = None,
              progress: bool = True) -> RemediationResult:
    """Fine-tune ``edited`` (in place) on ``samples`` (n, ctx) token rows; evaluate before and after."""
    from tqdm.auto import tqdm

    cfg = config or RemediateConfig()
    if samples.ndim != 2 or len(samples) == 0:
        raise ConfigError(f"Expected (n, ctx) token rows to remediate on, got shape {tuple(samples.shape)}.")
    before = dict(evaluator(edited)) if evaluator else {}
    model = _with_lora(edited, cfg) if cfg.lora else edited
    if model is edited:  # full fine-tuning (no LoRA wrapper): every weight trains
        for p in model.parameters():
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    model.train()
    for _ in tqdm(range(cfg.steps), desc="remediate", disable=not progress):
        idx = torch.randint(0, len(samples), (min(cfg.batch_size, len(samples)),), generator=gen)
        loss = _lm_loss(model, samples[idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    if cfg.lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    after = dict(evaluator(model)) if evaluator else {}
    return RemediationResult(model=model, n_samples=len(samples), latents=list(latents or []), before=before, after=after)


def save_remediation(result: RemediationResult, out_dir: str | os.PathLike[str], save_model: Callable[[Any, Path], None] | None = None) -> Path:
    """The before / after table (``remediation.csv``) and the model (HF ``save_pretrained`` or ``save_model``)."""
    out = Path(out_dir)
    table = result.table()
    atomic_write(out / "remediation.csv", lambda tmp: table.to_csv(tmp, index=False))
    model_dir = out / "model"
    if save_model is not None:
        save_model(result.model, model_dir)
    elif hasattr(result.model, "save_pretrained"):
        result.model.save_pretrained(model_dir)
    else:
        raise ConfigError("Pass save_model to save a TransformerLens model.")
    logger.info("Remediated model written to %s, before/after scores to %s.", model_dir, out / "remediation.csv")
    result.out_dir = out
    return out
