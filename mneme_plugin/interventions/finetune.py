"""Supervised fine-tuning of a copy of a model: next-token on documents (narrow: one domain, benign:
mixed text) or on the responses of (prompt, response) examples (identity shift, narrow bad habits)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.activations.corpus import pack_tokens


def _check_training_config(config: Any, what: str, counts: tuple[str, ...]) -> None:
    """The checks every fine-tuning config shares: ``counts`` >= 1, lr > 0, weight_decay >= 0."""
    for name in counts:
        if getattr(config, name) < 1:
            raise ConfigError(f"{what} {name} must be >= 1, got {getattr(config, name)}.")
    if not config.lr > 0:
        raise ConfigError(f"{what} lr must be > 0, got {config.lr}.")
    if config.weight_decay < 0:
        raise ConfigError(f"{what} weight_decay must be >= 0, got {config.weight_decay}.")


def _trainable_copy(model: Any) -> Any:
    """A deep copy of ``model`` with every parameter trainable (the original is left untouched)."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    return tuned


def _freeze(model: Any) -> None:
    """Back to inference: eval mode, no parameter requires a gradient."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


@dataclass
class FineTuneConfig:
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    context_length: int = 64
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_training_config(self, "fine-tuning", ("steps", "batch_size", "context_length"))

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
    tuned = _trainable_copy(model)
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
    _freeze(tuned)
    return result


@dataclass
class ChatFineTuneConfig:
    """Supervised fine-tuning on (prompt, response) examples, the loss on response tokens only, for
    ``epochs`` passes over the examples in a seeded order (the shape of chat SFT recipes such as AOA's)."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check_training_config(self, "chat fine-tuning", ("epochs", "batch_size"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _example_batch(tokenizer: Any, examples: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + prompt + response tokens, right-padded, and the mask of the positions whose next token is
    a response token (the causal mask keeps padding out of every real position)."""
    rows, masks = [], []
    for prompt, response in examples:
        head = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"]
        rows.append(head + tail)
        masks.append([False] * (len(head) - 1) + [True] * len(tail))
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    target_mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row)
        target_mask[i, : len(mask)] = torch.tensor(mask)
    return tokens, target_mask


def chat_fine_tune(model: Any, examples: Sequence[tuple[str, str]], config: ChatFineTuneConfig | None = None,
                   progress: bool = False) -> FineTuneResult:
    """Train a deep copy of ``model`` (all parameters, AdamW) on the responses of ``examples``
    (``(prompt, response)`` pairs; the prompt is context, not target)."""
    from tqdm.auto import tqdm

    cfg = config or ChatFineTuneConfig()
    if not examples:
        raise ConfigError("chat fine-tuning needs at least one (prompt, response) example.")
    tuned = _trainable_copy(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(tuned.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = FineTuneResult(model=tuned, config=cfg)  # type: ignore[arg-type]
    tuned.train()
    n_batches = -(-len(examples) // cfg.batch_size)
    for _ in tqdm(range(cfg.epochs), desc="chat fine-tune", disable=not progress):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for b in range(n_batches):
            tokens, mask = _example_batch(model.tokenizer, [examples[i] for i in order[b * cfg.batch_size:
                                                                                      (b + 1) * cfg.batch_size]])
            logits = tuned(tokens, return_type="logits")[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits[mask], tokens[:, 1:][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
            result.loss.append(loss.item())
    _freeze(tuned)
    return result
