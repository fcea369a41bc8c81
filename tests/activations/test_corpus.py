"""Corpus sources and packing into windows."""

from __future__ import annotations

import json

import pytest
import torch

from mneme_plugin.activations import iter_documents, iter_windows
from mneme_plugin.errors import ConfigError, EmptyCorpusError


def test_packing_bos_and_padding(tiny_tokenizer):
    docs = ["the cat sees a tree", "a dog finds the road today"]
    wins = list(iter_windows(docs, tiny_tokenizer, context_length=6))
    ids = [i for d in docs for i in tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]]
    assert all(int(w.tokens[0]) == tiny_tokenizer.bos_token_id for w in wins)
    body = torch.cat([w.tokens[1:][w.mask[1:]] for w in wins]).tolist()
    assert body == ids  # documents packed in order, EOS-separated, nothing lost
    assert [w.index for w in wins] == list(range(len(wins)))
    last = wins[-1]
    assert not last.mask.all() and (last.tokens[~last.mask] == tiny_tokenizer.pad_token_id).all()
    assert all(w.mask.all() for w in wins[:-1])


def test_deterministic_and_max_tokens(tiny_tokenizer, corpus):
    a = [w.tokens for w in iter_windows(corpus, tiny_tokenizer, 16)]
    b = [w.tokens for w in iter_windows(corpus, tiny_tokenizer, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    limited = list(iter_windows(corpus, tiny_tokenizer, 16, max_tokens=40))
    assert len(limited) == 3  # ceil(40 / 16) whole windows


def test_file_sources(tmp_path, tiny_tokenizer):
    docs = ["the cat sees a tree", "a dog finds the road"]
    (tmp_path / "c.txt").write_text("\n".join([docs[0], "", docs[1]]) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "c.parquet")
    assert list(iter_documents(tmp_path / "c.txt", tiny_tokenizer)) == docs
    assert list(iter_documents(str(tmp_path / "c.jsonl"), tiny_tokenizer, text_field="body")) == docs
    assert list(iter_documents(tmp_path / "c.parquet", tiny_tokenizer)) == docs
    with pytest.raises(ConfigError, match="text_field"):
        list(iter_documents(tmp_path / "c.jsonl", tiny_tokenizer))
    with pytest.raises(ConfigError, match="not a file"):
        list(iter_documents(tmp_path / "missing.txt", tiny_tokenizer))


def test_conversations_use_chat_template(tiny_tokenizer):
    rec = {"conversation": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"}]}
    (text,) = iter_documents([rec], tiny_tokenizer)
    assert text == tiny_tokenizer.apply_chat_template(rec["conversation"], tokenize=False)
    assert "user : hello" in text and "assistant : fine thanks" in text


@pytest.mark.parametrize("docs", [[], ["", ""], [{"text": ""}]])
def test_empty_corpus(tiny_tokenizer, docs):
    with pytest.raises(EmptyCorpusError, match="no tokens"):
        list(iter_windows(docs, tiny_tokenizer, 8))
