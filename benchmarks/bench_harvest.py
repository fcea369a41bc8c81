"""Harvest throughput on a tiny pair: stop-early vs full forward, and end-to-end harvest().

Run: python benchmarks/bench_harvest.py  (CPU is fine; prints tokens/s and the ratio.)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mneme_plugin.activations import HarvestConfig, forward_to_hook, harvest  # noqa: E402
from tests.helpers import make_hooked_transformer, make_tokenizer, synthetic_corpus  # noqa: E402

N_LAYERS, D_MODEL, LAYER, CTX, BATCH, N_BATCHES = 4, 128, 1, 128, 16, 12


@torch.no_grad()
def full_forward(model, tokens, hook_name):
    """Reference: capture the same activation but let every layer run."""
    got = {}

    def grab(act, hook):
        got["x"] = act

    with model.hooks(fwd_hooks=[(hook_name, grab)]):
        model(tokens, return_type=None)
    return got["x"]


def rate(fn, models, batches, hook):
    for m in models:  # warm-up
        fn(m, batches[0], hook)
    t0 = time.perf_counter()
    for b in batches:
        for m in models:
            fn(m, b, hook)
    return sum(b.numel() for b in batches) / (time.perf_counter() - t0)


def main() -> None:
    torch.manual_seed(0)
    tok = make_tokenizer()
    base = make_hooked_transformer(tok, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=4, n_ctx=CTX, seed=0)
    edited = make_hooked_transformer(tok, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=4, n_ctx=CTX, seed=1)
    hook = f"blocks.{LAYER}.hook_resid_post"
    batches = [torch.randint(4, len(tok), (BATCH, CTX)) for _ in range(N_BATCHES)]
    assert torch.equal(forward_to_hook(base, batches[0], hook), full_forward(base, batches[0], hook))
    stop = rate(forward_to_hook, (base, edited), batches, hook)
    full = rate(full_forward, (base, edited), batches, hook)
    print(f"pair: {N_LAYERS} layers, d_model {D_MODEL}, hook {hook}, batch {BATCH}x{CTX}, threads {torch.get_num_threads()}")
    print(f"stop-early forward (both models): {stop:,.0f} tokens/s")
    print(f"full forward       (both models): {full:,.0f} tokens/s")
    print(f"speed-up: {stop / full:.2f}x")

    corpus = synthetic_corpus(3000, seed=1)
    config = HarvestConfig(layer=LAYER, context_length=CTX, batch_size=BATCH, normalization_tokens=10_000, dtype="bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = harvest(base, edited, corpus, config, Path(tmp) / "store", progress=False)
        dt = time.perf_counter() - t0
        m = store.manifest
        print(
            f"harvest() end to end: {m['n_corpus_tokens']:,} corpus tokens -> {m['n_tokens']:,} rows in {dt:.2f}s "
            f"= {m['n_corpus_tokens'] / dt:,.0f} tokens/s (incl. normalisation pass and bf16 shard writes)"
        )


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
