"""Tiny HF causal LMs (Llama, Qwen2, Mistral) and a forget / retain corpus pair with disjoint words."""

from __future__ import annotations

import random

import pytest

from tests.helpers import GEN_CHAT_TEMPLATE, make_tokenizer, save_tiny_causal_lm, synthetic_corpus, write_jsonl

FORGET_WORDS = "gene dna cell virus protein enzyme pathogen toxin culture strain".split()


def forget_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(FORGET_WORDS) for _ in range(rng.randint(8, 20))) for _ in range(n)]


@pytest.fixture(scope="session")
def hf_tokenizer():
    tok = make_tokenizer(synthetic_corpus(400, seed=123) + forget_texts(50, seed=99))
    tok.chat_template = GEN_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_lm_dirs(tmp_path_factory, hf_tokenizer):
    """family -> folder of a tiny random model (3 layers, hidden 32) sharing ``hf_tokenizer``."""
    root = tmp_path_factory.mktemp("tiny_lms")
    return {fam: save_tiny_causal_lm(root / fam, fam, hf_tokenizer) for fam in ("llama", "qwen2", "mistral")}


@pytest.fixture(scope="session")
def rmu_corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmu_corpora")
    forget, retain = forget_texts(300, seed=0), synthetic_corpus(300, seed=3)
    return (write_jsonl(root / "forget.jsonl", [{"text": t} for t in forget]),
            write_jsonl(root / "retain.jsonl", [{"text": t} for t in retain]), forget, retain)
