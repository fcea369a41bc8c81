"""Delphi's explainers and scorers on planted latents, through our client against a local server: what
the prompts show.
Delphi and the tokenizer are real; only the LLM is the local FakeLLM."""

from __future__ import annotations

import random
import re

import pytest
import torch

from mneme_plugin.interpret import ClientConfig, ExplainConfig, TopContextCollector, explain, iter_records_delphi
from tests.helpers import FakeLLM, make_tokenizer, qwen2_style_tokenizer

# Latent -> the words it fires on (and only on).
TARGETS = {0: ["gene", "dna"], 1: ["oven", "flour"], 2: ["goal", "referee"], 3: ["court", "verdict"]}
FILLER = "the cat a dog sees likes house tree road today slowly friend".split()
CTX = 16


def latent_of(words):
    """The latent whose target words ``words`` are (None: none, or several latents')."""
    owners = {latent for latent, targets in TARGETS.items() for w in words if w in targets}
    return owners.pop() if len(owners) == 1 else None


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A collect folder (Delphi cache, saved tokenizer) where each context holds two words of one latent, at
    positions never adjacent, and that latent fires on exactly those tokens."""
    tok = make_tokenizer([" ".join(FILLER + [w for ws in TARGETS.values() for w in ws])] * 3)
    rng = random.Random(0)
    n = 120
    rows = []
    for c in range(n):
        words = [rng.choice(FILLER) for _ in range(CTX)]
        latent = c % len(TARGETS)
        for p in rng.sample(range(0, CTX, 2), 2):
            words[p] = rng.choice(TARGETS[latent])
        rows.append([tok.convert_tokens_to_ids(w) for w in words])
    tokens = torch.tensor(rows)
    owner = {tok.convert_tokens_to_ids(w): latent for latent, ws in TARGETS.items() for w in ws}
    acts = torch.zeros(n, CTX, len(TARGETS))
    for c in range(n):
        for p in range(CTX):
            if (latent := owner.get(int(tokens[c, p]))) is not None:
                acts[c, p, latent] = 1.0 + rng.random()
    col = TopContextCollector(list(TARGETS), CTX, n_top=10, n_random=10, n_non_activating=6, seed=0,
                              vocab_size=len(tok))
    col.update(tokens, acts, torch.ones(n, CTX, dtype=torch.bool))
    out = tmp_path_factory.mktemp("planted_delphi")
    col.result().save(out, "blocks.0.hook_resid_post", width=len(TARGETS), tokenizer=tok)
    return out


@pytest.fixture
def server():
    fake = FakeLLM()
    yield fake
    fake.close()


def config(server, tmp_path, explainer="default", scorers=(), concurrency=8, max_retries=3, **kw):
    client = ClientConfig(kind="openai", model="fake-model", base_url=server.url, api_key=None, timeout=5.0,
                          backoff_base=0.01, backoff_max=0.02, max_retries=max_retries, concurrency=concurrency,
                          cache_dir=str(tmp_path / "cache"))
    return ExplainConfig(explainer=explainer, client=client, n_examples=4, n_examples_test=4, n_quantiles=2,
                         min_examples=1, n_non_activating=4, scorers=list(scorers), **kw)


def text_of(body):
    return " ".join(m["content"] for m in body["messages"])


def is_explainer(body):
    return "[EXPLANATION]" in text_of(body)


def marked(line):
    """The words inside ``<<...>>`` of a line, and the words outside them."""
    inside = [w for span in re.findall(r"<<(.*?)>>", line) for w in span.split()]
    return inside, re.sub(r"<<.*?>>", " ", line).split()


def test_delphi_gets_one_string_per_token_that_joins_into_the_text(planted):
    from mneme_plugin.interpret.delphi_compat import PerTokenTokenizer

    tok = make_tokenizer([" ".join(FILLER)])
    ids = tok.encode("the cat sees a dog", add_special_tokens=False)
    pieces = PerTokenTokenizer(tok).batch_decode(torch.tensor(ids))
    assert len(pieces) == len(ids) and "".join(pieces) == "the cat sees a dog"
    assert PerTokenTokenizer(tok).batch_decode([ids, ids]) == ["the cat sees a dog"] * 2  # batches as before
    bpe = qwen2_style_tokenizer(tok)  # byte-level: a character of two tokens is one string on the second
    ids = bpe.encode("the cat \u65e5 sees", add_special_tokens=False)
    pieces = PerTokenTokenizer(bpe).batch_decode(ids)
    assert len(pieces) == len(ids) > 4 and "".join(pieces) == "the cat \u65e5 sees" and "\u65e5" in pieces
    record = next(iter(iter_records_delphi(planted, make_tokenizer([" ".join(FILLER)]), latents=[0])))
    for example in record.train + record.test + record.not_active:
        assert len(example.str_tokens) == len(example.tokens) == CTX


def test_explainer_prompts_mark_exactly_the_activating_tokens(planted, server, tmp_path):
    """Under transformers 5 Delphi got one string for a whole window: prompts wrapped whole windows in
    <<...>> or marked nothing, and the fuzz scorer highlighted whole windows."""
    table = explain(planted, config(server, tmp_path, scorers=["fuzz"]), out_dir=tmp_path, progress=False)
    assert sorted(table["latent"]) == sorted(TARGETS)
    prompts = [b["messages"][-1]["content"] for b in server.requests if is_explainer(b)]
    assert len(prompts) == len(TARGETS)
    seen = set()
    for prompt in prompts:
        lines = [line for line in prompt.strip().split("\n") if line]
        examples = [line for line in lines if not line.startswith("Activations:")]
        assert len(examples) == 4 and len(lines) == 8  # each example followed by its activations
        latent = latent_of(marked(examples[0])[0])
        assert latent is not None
        seen.add(latent)
        for line in examples:
            inside, outside = marked(line)
            assert len(inside) + len(outside) == CTX  # one word per token, spaces kept
            assert inside and set(inside) <= set(TARGETS[latent])  # the activating tokens are marked ...
            assert not set(outside) & set(TARGETS[latent])  # ... and nothing else
        for line in lines[1::2]:
            shown = re.findall(r'\("\s*([^"]*)" : \d+\)', line)
            assert shown and set(shown) <= set(TARGETS[latent])
    assert seen == set(TARGETS)
    fuzz = [b["messages"][-1]["content"] for b in server.requests if not is_explainer(b)]
    assert fuzz
    for prompt in fuzz:
        for line in re.findall(r"Example \d+: (.*)", prompt):
            spans = re.findall(r"<<(.*?)>>", line)
            assert spans and all(len(span.split()) <= 2 for span in spans), line
