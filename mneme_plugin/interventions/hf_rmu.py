"""RMU unlearning (Li et al. 2024, "The WMDP Benchmark") for any Hugging Face causal LM.

As in the reference implementation (github.com/centerforaisafety/wmdp, ``rmu/unlearn.py``): a
frozen copy and an updated copy of the model; ``h`` is the output of decoder layer ``layer_id``;
each forget corpus has a fixed random control vector ``c_i = steering_coeff_i * u / |u|``
(``u`` uniform in [0, 1)); step ``s`` takes the ``s // n_topics``-th batch of topic
``s % n_topics`` (topics alternate) and minimises::

    mean((h_upd(x_forget) - c_i)^2) + alpha_i * mean((h_upd(x_retain) - h_frozen(x_retain))^2)

with AdamW over the parameters chosen *by name* (default ``mlp.down_proj.weight`` of
``layer_ids``: the reference picks them by position in ``parameters()``, which differs between
Llama and Qwen2). One deliberate difference: the means run over real tokens only (the reference
also averages over right-padding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mneme_plugin.devices import check_device_name
from mneme_plugin.config import ConfigMixin, Seed, require
from mneme_plugin.errors import ConfigError, EmptyCorpusError, LayerOutOfRangeError
from mneme_plugin.files import holds_output_lock
from mneme_plugin.interventions.checkpoints import StepCallback, TrainingCheckpoints
from mneme_plugin.interventions.hf_models import (
    DTYPES,
    InterventionResult,
    decoder_layers,
    load_causal_lm,
    parameters_by_name,
)

logger = logging.getLogger("mneme_plugin")


@dataclass
class HFRMUConfig(ConfigMixin):
    """RMU on a HF causal LM. Per-topic values (``alpha``, ``steering_coeff``, ``forget_max_length``,
    ``retain_corpora``) are one value for every topic or a list with one value per forget corpus.

    Attributes:
        model: HF hub name or local folder of the model to unlearn from.
        forget_corpora / retain_corpora: corpus specs as ``harvest`` accepts them (a local
            .txt/.jsonl/.parquet file or ``hf:NAME[@CONFIG][:SPLIT]``).
        layer_id: decoder layer whose output is steered.
        layer_ids: layers whose ``mlp.down_proj.weight`` trains (when ``param_names`` is None), at or
            before ``layer_id`` (the forward pass stops there: later ones get no gradient).
        param_names: parameters to train, by (suffix of their) name, e.g.
            ``layers.7.mlp.down_proj.weight``; None means the default above. One the loss does not
            reach (past ``layer_id``) is refused at the first step.
        max_num_batches: optimiser steps (all topics together).
        min_chars / max_chars: texts of ``min_chars`` characters or fewer are skipped; with
            ``max_chars``, longer ones are cut there before tokenising. The reference (wmdp
            ``rmu/unlearn.py``: ``--min_len 0``; its ``--max_len`` is never applied) skips empty texts
            only and cuts none.
        forget_max_length / retain_max_length: token truncation per batch.
        checkpoint_every: optimiser steps between checkpoints in the output folder (0: none); a run
            given the same folder again resumes from the newest (``interventions.checkpoints``).
    """

    # Where and how often it saves, not what it computes (left out of `mneme run`'s fingerprint).
    runtime_fields = ("checkpoint_every",)

    model: str = ""
    forget_corpora: list[str] = field(default_factory=list)
    retain_corpora: list[str] = field(default_factory=list)
    layer_id: int = 7
    layer_ids: list[int] = field(default_factory=lambda: [5, 6, 7])
    param_names: list[str] | None = None
    alpha: float | list[float] = 100.0
    steering_coeff: float | list[float] = 20.0
    lr: float = 5e-5
    batch_size: int = 4
    max_num_batches: int = 80
    forget_max_length: int | list[int] = 512
    retain_max_length: int = 512
    min_chars: int = 0
    max_chars: int | None = None
    text_field: str = "text"
    seed: Seed = 42
    device: str = "auto"
    dtype: str = "auto"
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        check_device_name(self.device)
        self.forget_corpora = [str(c) for c in ([self.forget_corpora] if isinstance(self.forget_corpora, str)
                                                else self.forget_corpora)]
        self.retain_corpora = [str(c) for c in ([self.retain_corpora] if isinstance(self.retain_corpora, str)
                                                else self.retain_corpora)]
        self.layer_ids = [int(x) for x in self.layer_ids]
        n = len(self.forget_corpora)
        for name in ("alpha", "steering_coeff", "forget_max_length"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                require(len(value) in (1, max(n, 1)), f"RMU {name} has {len(value)} values for {n} forget corpora; "
                        "give one value or one per forget corpus.")
                setattr(self, name, list(value))
        require(len(self.retain_corpora) in (0, 1, n) or n == 0,
                f"RMU needs one retain corpus or one per forget corpus; got {len(self.retain_corpora)} for {n}.")
        require(self.layer_id >= 0 and all(l >= 0 for l in self.layer_ids), "RMU layer ids must be >= 0.")
        require(self.param_names is not None or all(l <= self.layer_id for l in self.layer_ids),
                f"RMU layer_ids {self.layer_ids} must be at or before layer_id {self.layer_id}: RMU steers that "
                "layer's output, so the layers after it get no gradient and would not change.")
        require(all(a >= 0 for a in self.per_topic("alpha", max(n, 1))), "RMU alpha must be >= 0.")
        require(all(c > 0 for c in self.per_topic("steering_coeff", max(n, 1))), "RMU steering_coeff must be > 0.")
        require(self.lr > 0, f"RMU lr must be > 0, got {self.lr}.")
        for name in ("batch_size", "max_num_batches", "retain_max_length"):
            require(getattr(self, name) >= 1, f"RMU {name} must be >= 1, got {getattr(self, name)}.")
        require(self.min_chars >= 0, f"RMU min_chars must be >= 0, got {self.min_chars}.")
        require(self.max_chars is None or self.max_chars >= 1,
                f"RMU max_chars must be >= 1 (or null: no cut), got {self.max_chars}.")
        require(all(m >= 1 for m in self.per_topic("forget_max_length", max(n, 1))), "forget_max_length must be >= 1.")
        require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}.")
        require(self.checkpoint_every >= 0,
                f"RMU checkpoint_every must be >= 0 (0 disables checkpoints), got {self.checkpoint_every}.")

    def data_sources(self) -> list[str]:
        """The corpora the edit reads (local files or ``hf:`` specs): forget, then retain."""
        return [*self.forget_corpora, *self.retain_corpora]

    def per_topic(self, name: str, n_topics: int | None = None) -> list[Any]:
        """``name``'s value for each forget corpus."""
        n = n_topics if n_topics is not None else len(self.forget_corpora)
        value = getattr(self, name)
        if not isinstance(value, list):
            return [value] * n
        return value * n if len(value) == 1 else list(value)

    def trained_parameter_names(self) -> list[str]:
        if self.param_names is not None:
            return list(self.param_names)
        return [f"layers.{l}.mlp.down_proj.weight" for l in self.layer_ids]

    def check_ready(self) -> None:
        """The checks that need the whole config (``from_dict({})`` stays valid for run sections)."""
        require(bool(self.model), "RMU needs `model` (a HF model name or folder).")
        require(bool(self.forget_corpora), "RMU needs at least one forget corpus (forget_corpora).")
        require(bool(self.retain_corpora), "RMU needs a retain corpus (retain_corpora).")


def read_texts(spec: str, n: int, text_field: str = "text", min_chars: int = 0, max_chars: int | None = None,
               tokenizer: Any = None) -> list[str]:
    """The first ``n`` texts of a corpus spec with more than ``min_chars`` characters, cut at ``max_chars``."""
    from mneme_plugin.activations.corpus import corpus_from_spec, iter_records, render_record

    texts: list[str] = []
    for record in iter_records(corpus_from_spec(spec)):
        text = render_record(record, tokenizer, text_field)
        if text and len(text) > min_chars:
            texts.append(text[:max_chars] if max_chars else text)
            if len(texts) == n:
                break
    return texts


class _Stop(Exception):
    pass


def layer_activations(model: Any, layer: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output hidden states of decoder ``layer`` (B, T, d); the forward stops after that layer."""
    store: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, output: Any) -> None:
        store["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return store["h"]


def masked_mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens and hidden units of (h - target)^2 (target broadcast)."""
    per_token = (h.float() - target.float()).pow(2).mean(-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def control_vectors(hidden_size: int, coeffs: list[float], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for coeff in coeffs:
        u = torch.rand(hidden_size, generator=gen)
        out.append(coeff * u / u.norm())
    return out


@holds_output_lock("out_dir", "output folder (--out)")
def rmu_unlearn_hf(config: HFRMUConfig, progress: bool = True, *, out_dir: str | Path | None = None,
                   resume: bool = True, on_step: StepCallback | None = None) -> InterventionResult:
    """Run RMU on ``config.model``; the returned result holds the updated model (save it with
    :func:`~mneme_plugin.interventions.hf_models.save_intervention`) and its control vectors.

    ``out_dir``: the output folder the model is to be written to; the run keeps its checkpoints there
    (every ``config.checkpoint_every`` steps) and resumes from them unless ``resume`` is False
    (``interventions.checkpoints.train_and_save`` does both). ``on_step(step, record)`` is called
    after every step with its log record.
    """
    from tqdm.auto import tqdm

    config.check_ready()
    updated, tokenizer = load_causal_lm(config.model, config.device, config.dtype)
    layers = decoder_layers(updated)
    if not 0 <= config.layer_id < len(layers):
        raise LayerOutOfRangeError(
            f"RMU layer_id {config.layer_id} is out of range: {config.model} has {len(layers)} decoder layers.")
    trained = parameters_by_name(updated, config.trained_parameter_names())
    frozen, _ = load_causal_lm(config.model, config.device, config.dtype)
    frozen.requires_grad_(False)
    updated.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(True)

    n_topics = len(config.forget_corpora)
    per_topic = -(-config.max_num_batches // n_topics)
    need = per_topic * config.batch_size
    retain_specs = config.retain_corpora * n_topics if len(config.retain_corpora) == 1 else config.retain_corpora
    forget_texts, retain_texts = [], []
    for spec in config.forget_corpora:
        texts = read_texts(spec, need, config.text_field, config.min_chars, config.max_chars, tokenizer)
        if not texts:
            raise EmptyCorpusError(f"Forget corpus {spec} has no text longer than min_chars={config.min_chars} "
                                   f"in field {config.text_field!r}.")
        forget_texts.append(texts)
    for spec in retain_specs:
        texts = read_texts(spec, need, config.text_field, config.min_chars, config.max_chars, tokenizer)
        if not texts:
            raise EmptyCorpusError(f"Retain corpus {spec} has no text longer than min_chars={config.min_chars} "
                                   f"in field {config.text_field!r}.")
        retain_texts.append(texts)
    batches = min(len(t) // config.batch_size or 1 for t in forget_texts + retain_texts)
    n_steps = min(config.max_num_batches, batches * n_topics)
    if n_steps < config.max_num_batches:
        logger.warning("RMU: the corpora give %d batches per topic; running %d steps instead of %d.",
                       batches, n_steps, config.max_num_batches)

    device = next(updated.parameters()).device
    controls = [c.to(device) for c in control_vectors(updated.config.hidden_size, config.per_topic("steering_coeff"),
                                                        config.seed)]
    alphas = config.per_topic("alpha")
    forget_lengths = config.per_topic("forget_max_length")
    frozen_layer = decoder_layers(frozen)[config.layer_id]
    updated_layer = layers[config.layer_id]
    optimizer = torch.optim.AdamW(list(trained.values()), lr=config.lr)
    tokenizer.padding_side = "right"
    checkpoints = TrainingCheckpoints(out_dir, config, [config.model, *config.data_sources()],
                                      config.checkpoint_every, resume=resume, label="RMU")
    start, log = checkpoints.restore(trained, optimizer, total_steps=n_steps, device=device,
                                     model_bytes=sum(p.numel() * p.element_size() for p in updated.parameters()))

    def encode(texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    result = InterventionResult(model=updated, tokenizer=tokenizer, config=config, log=log,
                                extra={"control_vectors": [c.cpu() for c in controls],
                                       "trained_parameters": list(trained)})
    updated.train()
    bar = tqdm(range(start, n_steps), desc="RMU", disable=not progress, total=n_steps, initial=start)
    if start:
        bar.set_description(f"RMU (resumed at step {start})")
    for step in bar:
        topic, index = step % n_topics, step // n_topics
        sl = slice(index * config.batch_size, (index + 1) * config.batch_size)
        forget = encode(forget_texts[topic][sl], forget_lengths[topic])
        retain = encode(retain_texts[topic][sl], config.retain_max_length)
        forget_loss = masked_mse(layer_activations(updated, updated_layer, forget), controls[topic],
                                 forget["attention_mask"])
        with torch.no_grad():
            frozen_retain = layer_activations(frozen, frozen_layer, retain)
        retain_loss = masked_mse(layer_activations(updated, updated_layer, retain), frozen_retain,
                                 retain["attention_mask"])
        loss = forget_loss + alphas[topic] * retain_loss
        optimizer.zero_grad()
        if not loss.requires_grad:
            _refuse_untrained(config, list(trained))
        loss.backward()
        if step == start:
            _refuse_untrained(config, [name for name, p in trained.items() if p.grad is None])
        optimizer.step()
        record = {"step": step, "topic": topic, "loss": loss.item(), "forget_loss": forget_loss.item(),
                  "retain_loss": retain_loss.item()}
        result.log.append(record)
        bar.set_postfix(forget=f"{record['forget_loss']:.3g}", retain=f"{record['retain_loss']:.3g}")
        if on_step is not None:
            on_step(step, record)
        checkpoints.save(step + 1, n_steps, trained, optimizer, None, result.log, device)
    bar.close()
    updated.eval()
    updated.requires_grad_(False)
    del frozen
    return result


def _refuse_untrained(config: HFRMUConfig, names: list[str]) -> None:
    """Trained parameters the loss does not reach (past the steered layer: the forward pass stops there)
    would get no gradient and stay as they are while the saved config lists them: refused."""
    if names:
        raise ConfigError(
            f"RMU steers the output of layer {config.layer_id}, so these trained parameters get no gradient and "
            f"would not change: {', '.join(names)}. Train parameters of layers 0..{config.layer_id} "
            "(layer_ids / param_names), or steer a later layer (layer_id).")


def rmu_activation_distances(model: Any, tokenizer: Any, frozen: Any, texts_forget: list[str],
                             texts_retain: list[str], config: HFRMUConfig, control: torch.Tensor,
                             ) -> tuple[float, float]:
    """(forget MSE to the control vector, retain MSE to the frozen model) over the given texts, at
    ``config.layer_id``: the two quantities RMU minimises, for measuring an unlearned model."""
    device = next(model.parameters()).device
    enc_f = tokenizer(texts_forget, return_tensors="pt", padding=True, truncation=True,
                      max_length=max(config.per_topic("forget_max_length", 1)))
    enc_r = tokenizer(texts_retain, return_tensors="pt", padding=True, truncation=True,
                      max_length=config.retain_max_length)
    enc_f = {k: v.to(device) for k, v in enc_f.items() if k in ("input_ids", "attention_mask")}
    enc_r = {k: v.to(device) for k, v in enc_r.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        layer = decoder_layers(model)[config.layer_id]
        forget = masked_mse(layer_activations(model, layer, enc_f), control.to(device), enc_f["attention_mask"])
        frozen_h = layer_activations(frozen, decoder_layers(frozen)[config.layer_id], enc_r)
        retain = masked_mse(layer_activations(model, layer, enc_r), frozen_h, enc_r["attention_mask"])
    return forget.item(), retain.item()


__all__ = ["HFRMUConfig", "rmu_unlearn_hf", "rmu_activation_distances", "control_vectors", "layer_activations",
           "read_texts"]
