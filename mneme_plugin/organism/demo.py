"""The built-in CPU demo: a tiny base LM, a narrowly fine-tuned copy, and a crosscoder between them.

Everything is generated and trained locally from a seed, so it runs on a laptop with no network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mneme_plugin.activations import ActivationStore, HarvestConfig, harvest
from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
from mneme_plugin.crosscoder.training import TrainResult, train
from mneme_plugin.organism.corpus import generate_corpus
from mneme_plugin.organism.models import finetuned_copy, tiny_hooked_transformer, train_lm, train_tokenizer

logger = logging.getLogger("mneme_plugin")


@dataclass
class DemoResult:
    store: ActivationStore
    training: TrainResult
    fine_tuned_domain: str


def run_demo(out_dir: str | Path, seed: int = 0, fine_tune_domain: str = "cooking", progress: bool = True) -> DemoResult:
    """Train the organism's base LM, fine-tune a copy on one domain, harvest both on mixed text,
    and train a crosscoder on the pair. Outputs go to ``out_dir`` (activations/, crosscoder_run/)."""
    out_dir = Path(out_dir)
    pretraining = [text for _, text in generate_corpus(4000, seed=seed)]
    tokenizer = train_tokenizer(pretraining)
    logger.info("Training the base LM on %d documents of 8 domains.", len(pretraining))
    base = tiny_hooked_transformer(tokenizer, n_layers=2, d_model=64, n_ctx=64, seed=seed)
    train_lm(base, pretraining, steps=300, lr=3e-3, batch_size=16, seed=seed, progress=progress)
    narrow = [text for domain, text in generate_corpus(800, seed=seed + 1, domains=[fine_tune_domain])]
    logger.info("Fine-tuning a copy on %s only.", fine_tune_domain)
    edited = finetuned_copy(base, narrow, steps=150, lr=3e-3, seed=seed + 1, batch_size=16, progress=progress)

    agnostic = [text for _, text in generate_corpus(3000, seed=seed + 2)]
    store = harvest(base, edited, agnostic, HarvestConfig(layer=1, context_length=32, dtype="float32"),
                    out_dir / "activations", progress=progress)
    result = train(
        store, out_dir / "crosscoder_run", CrossCoderConfig(expansion_factor=8, k=16),
        TrainingConfig(steps=1500, batch_size=256, lr=3e-3, warmup_steps=20, threshold_start_step=200,
                       checkpoint_every=500, eval_rows=4096, dead_after_tokens=500_000, seed=seed),
        progress=progress,
    )
    return DemoResult(store=store, training=result, fine_tuned_domain=fine_tune_domain)
