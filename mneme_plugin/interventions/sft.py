"""Supervised fine-tuning of a Hugging Face causal LM on chat or instruction data, loss on responses only.

Data: JSONL / parquet / ``hf:`` specs of either chat records (``messages``: a list of ``{role,
content}`` turns; every assistant turn is trained on) or Alpaca records (``instruction``, optional
``input``, ``output``). Prompts are rendered through the model's chat template (``chat_template``)
or a named prompt format (``alpaca``: the Stanford Alpaca template); prompt tokens get label -100.

Full fine-tuning, or LoRA through ``peft`` (rank, alpha, rsLoRA, dropout, target modules), merged
into the weights at the end so the output is a plain HF model folder. The token-level loss is the
mean over the response tokens of a whole accumulated optimiser step (not a mean of per-micro-batch
means), so gradient accumulation equals one large batch.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mneme_plugin.devices import check_device_name
from mneme_plugin.config import ConfigMixin, Seed, require
from mneme_plugin.errors import ConfigError, EmptyCorpusError
from mneme_plugin.files import holds_output_lock
from mneme_plugin.interventions.checkpoints import StepCallback, TrainingCheckpoints
from mneme_plugin.interventions.hf_models import DTYPES, InterventionResult, load_causal_lm

logger = logging.getLogger("mneme_plugin")

DATA_FORMATS = ("auto", "messages", "alpaca")
PROMPT_FORMATS = ("auto", "chat_template", "alpaca")
SCHEDULERS = ("constant", "linear", "cosine", "step")
IGNORE_INDEX = -100
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class LoRASettings(ConfigMixin):
    """LoRA through peft; the adapters are merged into the weights at the end."""

    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    use_rslora: bool = True
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))

    def __post_init__(self) -> None:
        require(self.r >= 1, f"LoRA r must be >= 1, got {self.r}.")
        require(self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}.")
        require(0 <= self.dropout < 1, f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        require(bool(self.target_modules), "LoRA target_modules must not be empty.")


@dataclass
class SFTConfig(ConfigMixin):
    """Supervised fine-tuning.

    Attributes:
        model: HF hub name or local folder.
        data: a local .jsonl / .parquet file or ``hf:NAME[@CONFIG][:SPLIT]``.
        data_format: "messages" (chat records), "alpaca" (instruction / input / output) or "auto".
        prompt_format: "chat_template" (the tokenizer's), "alpaca", or "auto" (the chat template
            when the tokenizer has one, else alpaca).
        system_prompt: prepended as a system turn to every example (chat template only), if set.
        max_length: tokens per example (longer ones are cut; examples left without a response token
            are dropped).
        batch_size / grad_accum: examples per micro-batch and micro-batches per optimiser step.
        lr_scheduler: "constant", "linear" (decay to 0), "cosine", or "step" (x ``step_decay``
            each epoch); all after ``warmup_steps`` linear warm-up steps, (s + 1) / (warmup_steps + 1)
            of ``lr`` at step s (HF's ``get_linear_schedule_with_warmup`` takes s / warmup_steps and so
            spends its first step at lr 0; the decay after the warm-up is the same).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        lora: None for full fine-tuning, else the LoRA settings.
        checkpoint_every: optimiser steps between checkpoints in the output folder (0: none); a run
            given the same folder again resumes from the newest (``interventions.checkpoints``).
    """

    # Where and how often it saves, not what it computes (left out of `mneme run`'s fingerprint).
    runtime_fields = ("checkpoint_every",)

    model: str = ""
    data: str = ""
    data_format: str = "auto"
    prompt_format: str = "auto"
    system_prompt: str | None = None
    max_length: int = 2048
    max_examples: int | None = None
    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 2
    grad_accum: int = 8
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    step_decay: float = 0.85
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    lora: LoRASettings | None = None
    shuffle: bool = True
    seed: Seed = 0
    device: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if isinstance(self.lora, dict):
            self.lora = LoRASettings.from_dict(self.lora)
        self.data = str(self.data)
        require(self.data_format in DATA_FORMATS, f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}.")
        require(self.prompt_format in PROMPT_FORMATS,
                f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}.")
        require(self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}.")
        for name in ("max_length", "epochs", "batch_size", "grad_accum"):
            require(getattr(self, name) >= 1, f"SFT {name} must be >= 1, got {getattr(self, name)}.")
        require(self.lr > 0, f"SFT lr must be > 0, got {self.lr}.")
        require(self.warmup_steps >= 0 and self.weight_decay >= 0, "warmup_steps and weight_decay must be >= 0.")
        require(0 < self.step_decay <= 1, f"step_decay must be in (0, 1], got {self.step_decay}.")
        require(self.max_examples is None or self.max_examples >= 1, "max_examples must be None or >= 1.")
        require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        require(self.checkpoint_every >= 0,
                f"SFT checkpoint_every must be >= 0 (0 disables checkpoints), got {self.checkpoint_every}.")

    def data_sources(self) -> list[str]:
        """The training data the edit reads (a local file or folder, or an ``hf:`` spec)."""
        return [self.data] if self.data else []

    def check_ready(self) -> None:
        require(bool(self.model), "SFT needs `model` (a HF model name or folder).")
        require(bool(self.data), "SFT needs `data` (a .jsonl/.parquet file or hf:NAME spec).")


# ----------------------------------------------------------------------------- examples


def record_format(record: Any) -> str:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return "messages"
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        return "alpaca"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConfigError(f"SFT record is neither chat data (a `messages` list) nor Alpaca data (`instruction`, "
                      f"`output`): it has {keys}.")


def alpaca_to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _segments_chat(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """(text, trained) segments whose concatenation is the template's rendering of ``messages``."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= done):
            raise ConfigError("The chat template does not render a conversation's prefixes as prefixes of the whole "
                              "(needed to find the response tokens); use prompt_format: alpaca.")
        segments += [(prefix[done:], False), (upto[len(prefix):], True)]
        done = len(upto)
    segments.append((full[done:], False))
    return segments


def example_segments(record: dict[str, Any], tokenizer: Any, config: SFTConfig) -> list[tuple[str, bool]]:
    """The rendered example as (text, trained) segments."""
    fmt = record_format(record) if config.data_format == "auto" else config.data_format
    prompt_format = config.prompt_format
    if prompt_format == "auto":
        prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if prompt_format == "alpaca":
        if fmt == "messages":
            turns = record["messages"]
            if len(turns) != 2 or turns[-1]["role"] != "assistant":
                raise ConfigError("prompt_format alpaca needs single-turn data (one user turn, one assistant turn).")
            record = {"instruction": turns[0]["content"], "output": turns[1]["content"]}
        elif "instruction" not in record or "output" not in record:
            raise ConfigError(f"Alpaca record lacks `instruction` / `output`: it has {sorted(record)}.")
        template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
        return [(prompt, False), (record["output"] + (tokenizer.eos_token or ""), True)]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("prompt_format chat_template needs a tokenizer with a chat template; use prompt_format: alpaca.")
    if fmt == "messages":
        if not isinstance(record.get("messages"), list):
            raise ConfigError(f"Chat record lacks a `messages` list: it has {sorted(record)}.")
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    else:
        messages = alpaca_to_messages(record)
    if config.system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": config.system_prompt}, *messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError("A chat record has no assistant turn to train on.")
    return _segments_chat(messages, tokenizer)


def encode_example(segments: list[tuple[str, bool]], tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are the ids on trained segments and -100 elsewhere.

    The whole text is tokenised at once (so token boundaries are those of the full text); a token
    is trained when it starts inside a trained segment.
    """
    text = "".join(s for s, _ in segments)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for s, trained in segments:
        if trained:
            spans.append((pos, pos + len(s)))
        pos += len(s)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for t, (start, _) in zip(ids, enc["offset_mapping"])]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos) and not text.startswith(tokenizer.bos_token or "\0"):
        ids, labels = [bos] + ids, [IGNORE_INDEX] + labels
    return ids[:max_length], labels[:max_length]


def load_examples(config: SFTConfig, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    from mneme_plugin.activations.corpus import corpus_from_spec, iter_records

    examples, dropped = [], 0
    for record in iter_records(corpus_from_spec(config.data)):
        ids, labels = encode_example(example_segments(record, tokenizer, config), tokenizer, config.max_length)
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append((ids, labels))
        if config.max_examples is not None and len(examples) == config.max_examples:
            break
    if dropped:
        logger.warning("SFT: %d example(s) had no response token within max_length=%d and were dropped.",
                       dropped, config.max_length)
    if not examples:
        raise EmptyCorpusError(f"SFT data {config.data} gave no example with a response to train on.")
    return examples


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def response_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled tokens, their count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def lr_factor(config: SFTConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of ``config.lr`` at optimiser step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_scheduler == "constant":
        return 1.0
    if config.lr_scheduler == "step":
        return config.step_decay ** (step // steps_per_epoch)
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lora(model: Any, settings: LoRASettings) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ConfigError("LoRA needs peft: pip install 'mneme-plugin[finetune]'.") from err
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = sorted(set(settings.target_modules) - names)
    if missing:
        raise ConfigError(f"LoRA target module(s) {missing} do not exist in {type(model).__name__}.")
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      use_rslora=settings.use_rslora, target_modules=list(settings.target_modules), bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


@holds_output_lock("out_dir", "output folder (--out)")
def supervised_fine_tune(config: SFTConfig, progress: bool = True, *, out_dir: str | Path | None = None,
                         resume: bool = True, on_step: StepCallback | None = None) -> InterventionResult:
    """Fine-tune ``config.model`` on ``config.data``; returns the (merged) model and the training log.

    ``out_dir``: the output folder the model is to be written to; the run keeps its checkpoints there
    (every ``config.checkpoint_every`` optimiser steps: the trained parameters, for LoRA the adapters,
    with the optimizer, the schedule and the RNG) and resumes from them unless ``resume`` is False
    (``interventions.checkpoints.train_and_save`` does both). ``on_step(step, record)`` is called
    after every optimiser step with its log record.
    """
    from tqdm.auto import tqdm

    config.check_ready()
    model, tokenizer = load_causal_lm(config.model, config.device, config.dtype)
    examples = load_examples(config, tokenizer)
    torch.manual_seed(config.seed)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # LoRA: the frozen embeddings' output must carry gradients
    if config.lora is not None:
        model = apply_lora(model, config.lora)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trained.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    n_batches = -(-len(examples) // config.batch_size)
    steps_per_epoch = -(-n_batches // config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(config, s, total_steps, steps_per_epoch))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    rng = random.Random(config.seed)
    checkpoints = TrainingCheckpoints(out_dir, config, [config.model, *config.data_sources()], config.checkpoint_every,
                                      resume=resume, label="SFT")
    # The model written at the end: LoRA's adapters are merged into the weights (their own bytes are few).
    start_step, log = checkpoints.restore(trained, optimizer, scheduler, total_steps=total_steps, device=device,
                                          model_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    result = InterventionResult(model=model, tokenizer=tokenizer, config=config, log=log,
                                extra={"n_examples": len(examples), "trainable_parameters": sum(p.numel() for p in params)})
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc="SFT", disable=not progress)
    if start_step:
        bar.set_description(f"SFT (resumed at step {start_step})")
    step = 0
    for epoch in range(config.epochs):
        order = list(range(len(examples)))
        if config.shuffle:
            rng.shuffle(order)  # every epoch's, done ones too: the order is a function of the seed and the epoch
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for start in range(0, len(batches), config.grad_accum):
            if step < start_step:  # done before the checkpoint this run resumed from
                step += 1
                continue
            group = [collate([examples[i] for i in b], pad) for b in batches[start : start + config.grad_accum]]
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)
            total = 0.0
            for batch in group:
                loss_sum, _ = response_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
                (loss_sum / max(n_tokens, 1)).backward()
                total += loss_sum.item()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            record = {"step": step, "epoch": epoch, "loss": total / max(n_tokens, 1), "lr": lr, "tokens": n_tokens}
            result.log.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            if on_step is not None:
                on_step(step, record)
            step += 1
            checkpoints.save(step, total_steps, trained, optimizer, scheduler, result.log, device)
    bar.close()
    model.eval()
    if config.lora is not None:
        model = model.merge_and_unload()
        result.model = model
    model.requires_grad_(False)
    return result
