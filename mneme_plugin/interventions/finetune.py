"""Supervised (next-token) fine-tuning of a copy of a model: narrow (one domain) or benign (mixed text)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.organism.models import pack_tokens


@dataclass
class FineTuneConfig:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    context_length: int = 64
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"fine-tuning {name} must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ConfigError(f"fine-tuning lr must be > 0, got {self.lr}.")
        if self.weight_decay < 0:
            raise ConfigError(f"fine-tuning weight_decay must be >= 0, got {self.weight_decay}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FineTuneResult:
    model: Any
    config: FineTuneConfig
    loss: list[float] = field(default_factory=list)


def fine_tune(model: Any, texts: Sequence[str], config: FineTuneConfig | None = None,
              progress: bool = False) -> FineTuneResult:
    """Train a deep copy of ``model`` (all parameters, AdamW) on next-token loss over ``texts``."""
    from tqdm.auto import tqdm

    cfg = config or FineTuneConfig()
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    data = pack_tokens(model.tokenizer, texts, cfg.context_length)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(tuned.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = FineTuneResult(model=tuned, config=cfg)
    tuned.train()
    for _ in tqdm(range(cfg.steps), desc="fine-tune", disable=not progress):
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
        loss = tuned(data[idx], return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.loss.append(loss.item())
    tuned.eval()
    for p in tuned.parameters():
        p.requires_grad_(False)
    return result
