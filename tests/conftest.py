"""Session-scoped tiny models (built once, locally, no network)."""

from __future__ import annotations

import os

import pytest

# Nothing in the tests may reach the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tests.helpers import (  # noqa: E402
    make_finetuned_copy,
    make_hooked_transformer,
    make_tokenizer,
    save_tiny_llama,
    synthetic_corpus,
)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return synthetic_corpus(120, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def ht_pair(tiny_tokenizer):
    """(base, edited) HookedTransformers: 2 layers, d_model 32; edited really fine-tuned."""
    base = make_hooked_transformer(tiny_tokenizer, n_layers=2, d_model=32, seed=0)
    edited = make_finetuned_copy(base, synthetic_corpus(60, seed=7), steps=5, lr=3e-3, seed=1)
    return base, edited


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, n_layers=2, hidden_size=32)


@pytest.fixture(scope="session")
def bridge_pair(llama_dir):
    """(base, edited) TransformerBridges booted by path from a local tiny Llama folder."""
    from mneme_plugin.activations import load_model

    base = load_model(str(llama_dir))
    edited = make_finetuned_copy(base, synthetic_corpus(60, seed=7), steps=5, lr=3e-3, seed=1)
    return base, edited
