"""Session-scoped tiny models (built once, locally, no network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache of this test's own, read by the real (offline) hub client; a test lays
    out the repos it needs there with ``tests.helpers.hub_cache_repo``."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "the tests must never reach the hub"
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # where the client looks, as HF_HUB_CACHE= would say
    return cache


ROOT = Path(__file__).resolve().parents[1]
HOLDER = (
    "import sys, time\n"
    "from mneme_plugin.files import output_lock\n"
    "with output_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(600)\n"
)


@pytest.fixture
def held_lock(tmp_path):
    """A folder locked by another process (as by a running `mneme train --out` on it)."""
    folder = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    yield folder, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
