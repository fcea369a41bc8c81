"""Delphi's explainers and scorers on planted latents, through our client against a local server: what
the prompts show, unparsed explainer answers, failed scorer calls and reproducible scorer prompts.
Delphi and the tokenizer are real; only the LLM is the local FakeLLM."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.interpret import (
    ClientConfig, ClientError, ExplainConfig, MapConfig, TopContextCollector, explain, iter_records_delphi,
    load_explanations, map_descriptions,
)
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
    assert sorted(table["latent"]) == sorted(TARGETS) and table["parsed"].all()
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


def test_contrastive_explainer_shows_non_activating_examples(planted, server, tmp_path):
    """Delphi 0.1.3's ContrastiveExplainer raised AttributeError (normalized_activations of a
    NonActivatingExample) before asking anything."""
    table = explain(planted, config(server, tmp_path, explainer="contrastive"), out_dir=tmp_path, progress=False)
    assert table["parsed"].all() and (table["explanation"] == "mentions of gene and dna").all()
    assert len(server.requests) == len(TARGETS)
    for body in server.requests:
        prompt = body["messages"][-1]["content"]
        activating, non_activating = prompt.split("NON-ACTIVATING EXAMPLES:")
        assert "<<" in activating and "<<" not in non_activating
        assert len(re.findall(r"Example \d+:", non_activating)) == 4


def test_unparsed_answers_give_no_explanation_and_are_asked_again(planted, server, tmp_path, caplog):
    """An answer without [EXPLANATION]: became the explanation "Explanation could not be parsed.", was mapped
    to a category and was read back from the cache by every rerun."""
    def reply(body, fixed=False):
        if is_explainer(body):
            prompt = body["messages"][-1]["content"]
            text = "It is about genes." if "gene" in prompt and not fixed else "[EXPLANATION]: planted words"
        else:
            text = "[1, 0, 1, 0, 1]"
        return {"message": {"role": "assistant", "content": text}}

    server.reply = reply
    cfg = config(server, tmp_path, scorers=["detection"])
    with caplog.at_level(logging.WARNING, logger="mneme_plugin"):
        table = explain(planted, cfg, out_dir=tmp_path, progress=False)
    row = table.set_index("latent").loc[0]
    assert not row["parsed"] and row["explanation"] == "" and np.isnan(row["detection"])
    assert row["detection_scored"] == 0
    assert table.set_index("latent").drop(0)["parsed"].all()
    assert "1 of 4 latents got an explainer answer without '[EXPLANATION]:' (latent 0: 'It is about genes.')" \
        in caplog.text
    scorer_prompts = [b for b in server.requests if not is_explainer(b)]
    assert not any("Explanation could not be parsed" in text_of(b) for b in scorer_prompts)  # not scored
    mapping = map_descriptions(tmp_path, MapConfig(taxonomies=["organism"]))
    assert 0 not in set(mapping["latent"]) and set(mapping["latent"]) == {1, 2, 3}  # no category, no evidence
    assert "unparsed:      1 latents" in CliRunner().invoke(main, ["info", str(tmp_path)]).output
    assert load_explanations(tmp_path)["parsed"].tolist() == table["parsed"].tolist()

    n = len(server.requests)
    server.reply = lambda body: reply(body, fixed=True)
    again = explain(planted, cfg, out_dir=tmp_path, progress=False)
    asked = server.requests[n:]
    assert sum(is_explainer(b) for b in asked) == 1  # latent 0's prompt, not its cached answer
    assert again["parsed"].all() and again.set_index("latent").loc[0, "explanation"] == "planted words"


def test_tables_written_before_the_parsed_column_map_no_unparsed_answer():
    import pandas as pd

    table = pd.DataFrame({"latent": [0, 1], "explanation": ["Explanation could not be parsed.", "dna and genes"]})
    assert map_descriptions(table, MapConfig(taxonomies=["organism"]))["latent"].unique().tolist() == [1]


def test_every_scorer_call_failing_fails_the_stage(planted, server, tmp_path):
    """Delphi's scorers catch failed calls: explain wrote detection = NaN everywhere and exited 0."""
    server.reply = lambda body: ({"message": {"role": "assistant", "content": "[EXPLANATION]: planted words"}}
                                 if is_explainer(body) else 500)
    with pytest.raises(ClientError, match=r"detection scorer scored no sample: (\d+) of \1 calls failed .*HTTP 500"):
        explain(planted, config(server, tmp_path, scorers=["detection"], max_retries=0), out_dir=tmp_path,
                progress=False)
    assert not (tmp_path / "explanations.parquet").exists()


def test_some_scorer_calls_failing_are_counted_per_latent(planted, server, tmp_path, caplog):
    failing = [1]  # of a latent's two calls (8 samples, 5 a call)

    def reply(body):
        if is_explainer(body):
            return {"message": {"role": "assistant", "content": "[EXPLANATION]: planted words"}}
        if failing[0] > 0:
            failing[0] -= 1
            return 500
        return {"message": {"role": "assistant", "content": "[1, 1, 0, 0, 1]"}}

    server.reply = reply
    cfg = config(server, tmp_path, scorers=["detection"], max_retries=0, concurrency=1)
    with caplog.at_level(logging.WARNING, logger="mneme_plugin"):
        table = explain(planted, cfg, out_dir=tmp_path, progress=False)
    calls = sum(not is_explainer(b) for b in server.requests)
    assert f"1 of {calls} detection scorer calls failed" in caplog.text
    assert table["detection_failed"].sum() == 1
    hit = table["detection_failed"] > 0
    assert (table.loc[hit, "detection_scored"] < table.loc[~hit, "detection_scored"].min()).all()
    assert table["detection"].notna().all()
    assert "detection:     1 failed scorer calls (1 latents scored on fewer samples)" in CliRunner().invoke(main, ["info", str(tmp_path)]).output


def test_scorer_prompts_do_not_depend_on_the_order_latents_finish(planted, server, tmp_path):
    """Delphi's scorers shuffle with one RNG shared by all latents, drawn from in the order they finish: a
    rerun at concurrency > 1 sent other scorer prompts (paid again) and scored otherwise."""
    def reply(body):
        prompt = body["messages"][-1]["content"]
        if is_explainer(body):
            latent = latent_of(marked(prompt.strip().split("\n")[0])[0])
            time.sleep(0.1 * (len(TARGETS) - latent))  # the latents finish in reverse order
            return {"message": {"role": "assistant", "content": f"[EXPLANATION]: words of latent {latent}"}}
        bits = [hashlib.sha256(f"{i}{line}".encode()).digest()[0] % 2  # by position: the order matters
                for i, line in enumerate(re.findall(r"Example \d+: (.*)", prompt))]
        return {"message": {"role": "assistant", "content": json.dumps((bits + [0] * 5)[:5])}}

    server.reply = reply
    cfg = config(server, tmp_path, scorers=["detection", "fuzz"], concurrency=4)
    first = explain(planted, cfg, out_dir=tmp_path, progress=False)
    n = len(server.requests)
    again = explain(planted, cfg, out_dir=tmp_path, progress=False)
    assert len(server.requests) == n  # every prompt the same: all from the cache
    for name in ("detection", "fuzz"):
        assert again[name].tolist() == first[name].tolist()
    explain(planted, cfg.replace(seed=1), out_dir=tmp_path, progress=False)
    asked = server.requests[n:]
    assert asked and not any(is_explainer(b) for b in asked)  # the seed shuffles the scorers' samples only
