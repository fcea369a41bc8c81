"""Corpus sources and packing into windows."""

from __future__ import annotations

import json

import pytest
import torch

from mneme_plugin.activations import iter_documents, iter_windows
from mneme_plugin.errors import ConfigError, EmptyCorpusError
from tests.helpers import make_tokenizer


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
    assert all(torch.equal(w.tokens, x) for w, x in zip(limited, a[:3]))  # the first three, unchanged


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


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_file_of_non_utf8_bytes_names_the_line(tmp_path, tiny_tokenizer, suffix):
    good = "the cat sees a tree" if suffix == ".txt" else json.dumps({"text": "the cat sees a tree"})
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes((good + "\n").encode() * 3 + "caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"latin1{suffix} is not UTF-8 text: line 4 .*iconv"):
        list(iter_documents(path, tiny_tokenizer))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_parquet_is_a_config_error(tmp_path, tiny_tokenizer, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(500)]}), path)
    data = path.read_bytes()
    path.write_bytes(b"not a parquet file at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"c\.parquet is not a readable parquet file"):
        list(iter_documents(path, tiny_tokenizer))


def test_corpus_fingerprint_tells_files_apart_by_content_not_name_or_mtime(tmp_path):
    import os
    import shutil

    from mneme_plugin.activations.corpus import HFDataset, corpus_fingerprint

    big = tmp_path / "big.txt"
    lines = [f"document number {i} about nothing in particular" for i in range(120_000)]  # ~5.6 MB: sampled
    big.write_text("\n".join(lines) + "\n")
    copy = tmp_path / "copy.txt"
    shutil.copyfile(big, copy)
    os.utime(copy, (1, 1))
    assert corpus_fingerprint(big) == corpus_fingerprint(copy) == corpus_fingerprint(str(big))
    fingerprints = {corpus_fingerprint(big)}
    for edit in ("append", "truncate", "first_mib", "last_mib"):
        changed = tmp_path / f"{edit}.txt"
        data = bytearray(big.read_bytes())
        if edit == "append":
            data += b"one more line\n"
        elif edit == "truncate":
            data = data[:-100]
        else:
            at = 10 if edit == "first_mib" else len(data) - 10
            data[at] = ord("X")
        changed.write_bytes(bytes(data))
        fingerprints.add(corpus_fingerprint(changed))
    assert len(fingerprints) == 5
    assert corpus_fingerprint(["a", "b"]) == corpus_fingerprint(["a", "b"]) != corpus_fingerprint(["a", "c"])
    assert corpus_fingerprint(HFDataset("x/y", None, "train")) == "hf:x/y:train"
    assert corpus_fingerprint(iter(["a"])) is None and corpus_fingerprint(tmp_path / "missing.txt") is None


def test_an_unreadable_hub_dataset_is_a_clear_error():
    """A dataset the hub cannot give (offline here, as on a machine without network) is a ConfigError
    that names the spec and what to check, not the datasets library's traceback."""
    import os
    import subprocess
    import sys

    code = ("from mneme_plugin.activations.corpus import HFDataset\n"
            "from mneme_plugin.errors import ConfigError\n"
            "try:\n    next(iter(HFDataset('nosuch-owner/nosuch-ds').records()))\n"
            "except ConfigError as err:\n    print('CONFIG ERROR:', err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    assert "CONFIG ERROR: Cannot read the Hugging Face dataset hf:nosuch-owner/nosuch-ds:train" in out
    assert "huggingface-cli login" in out


def test_a_record_without_the_text_field_says_where_to_name_it(tmp_path, tiny_tokenizer):
    """The message said "Set text_field / messages_field in the HarvestConfig", a Python class a command-line
    user never sees; it now names the config key too, which `--config` accepts as said."""
    from mneme_plugin.activations.config import HarvestConfig

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"content": "the cat sees the dog"}) + "\n")
    with pytest.raises(ConfigError, match=r"its keys are \['content'\]\. Name the field that holds the text: "
                                          r"text_field \(messages_field for chat records\) in the harvest section"):
        list(iter_documents(path, tiny_tokenizer))
    assert HarvestConfig.from_dict({"layer": 0, "text_field": "content"}, section="harvest").text_field == "content"
    assert list(iter_documents(path, tiny_tokenizer, text_field="content")) == ["the cat sees the dog"]


def test_the_python_api_takes_the_hf_corpus_spec_of_the_cli(tmp_path):
    """`harvest(base, edited, "hf:NAME", ...)` as the README writes it: the string is read as the dataset it names
    (it was taken for a file name). A local dataset folder, which `datasets.load_dataset` reads offline, stands
    for a hub name here."""
    from mneme_plugin.activations.corpus import HFDataset, corpus_fingerprint, describe_corpus, iter_records

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"text": f"document number {i}"} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"hf:{folder}"
    assert [r["text"] for r in iter_records(spec)] == [r["text"] for r in rows]
    assert describe_corpus(spec) == corpus_fingerprint(spec) == f"hf:{folder}:train"
    assert [r["text"] for r in iter_records(HFDataset(str(folder)))] == [r["text"] for r in rows]


def test_pack_tokens_prefixes_bos_only_when_the_tokenizer_has_one(tiny_tokenizer):
    """pack_tokens (the organism's and SFT / RMU's training data) prepended bos_token_id even when it is None
    (Qwen-family tokenizers), a RuntimeError from torch.tensor; without BOS it now prefixes nothing."""
    from mneme_plugin.activations.corpus import pack_tokens
    from tests.helpers import make_tokenizer

    docs = ["the cat sees a tree", "a dog finds the road today", "my friend counts the number"]
    encoded = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    with_bos = [i for ids in encoded for i in [tiny_tokenizer.bos_token_id, *ids]]
    packed = pack_tokens(tiny_tokenizer, docs, 5)
    assert packed.tolist() == [with_bos[i:i + 5] for i in range(0, len(with_bos) // 5 * 5, 5)]

    no_bos = make_tokenizer()  # its own copy: the session tokenizer stays as it is
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    flat = [i for ids in encoded for i in ids]
    packed = pack_tokens(no_bos, docs, 5)
    assert packed.tolist() == [flat[i:i + 5] for i in range(0, len(flat) // 5 * 5, 5)]


@pytest.mark.parametrize("record, field, problem", [
    ({"conversation": [{"from": "human", "value": "the cat sees a tree"}]}, "conversation",
     r"has a turn 0 without 'role' and 'content' \(its keys: \['from', 'value'\]\)"),
    ({"conversation": "the cat sees a tree"}, "conversation", "holds a str, not a list"),
    ({"messages": {"role": "user", "content": "the cat"}}, "messages", "holds a dict, not a list"),
    ({"messages": ["the cat", "a dog"]}, "messages", "holds a str as turn 0"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}, "messages",
     r"has a turn 1 without 'content'"),
])
def test_chat_records_of_another_shape_name_the_record_and_the_expected_shape(tmp_path, tiny_tokenizer, record, field,
                                                                                problem):
    """ShareGPT turns, a conversation given as a string or as one dict gave a raw KeyError / TypeError from the
    chat rendering; the ConfigError names the record (counted from 1), its field and the shape expected."""
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"text": "a dog"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=rf"^Corpus record 3: its chat field '{field}' \(messages_field\) {problem}.*"
                                          r'expected a list of \{"role": \.\.\., "content": \.\.\.\} dicts') as refused:
        list(iter_documents(path, tiny_tokenizer))
    # ShareGPT turns get the mapping to the expected keys; the other shapes no word about ShareGPT.
    assert ('role = "from", content = "value"' in str(refused.value)) == ("from" in json.dumps(record))
    assert len(list(iter_documents([good, good], tiny_tokenizer))) == 2  # the expected shape still renders


def _reference_windows(docs, tokenizer, context_length, max_tokens=None):
    """The packing by its definition: every document's ids and EOS in one stream, cut into bodies of
    context_length - 1 after a BOS, the last one padded; at most ceil(max_tokens / context_length) windows."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = [i for d, doc_ids in zip(docs, ids) if d for i in [*doc_ids, tokenizer.eos_token_id]]
    body = context_length - 1
    out = []
    for start in range(0, len(stream), body):
        real = [tokenizer.bos_token_id, *stream[start:start + body]]
        out.append((real + [tokenizer.pad_token_id] * (context_length - len(real)),
                    [True] * len(real) + [False] * (context_length - len(real))))
    return out if max_tokens is None else out[: -(-max_tokens // context_length)]


def test_a_long_document_packs_as_defined():
    """iter_windows cut its buffer per window (buffer = buffer[body:]), copying the rest of a long document
    each time: quadratic in its length (400k tokens: seconds; it now reads at an offset). The windows are
    those of the definition, for a document of many windows between short ones."""
    import random

    words = "the cat a dog sees likes house tree road today slowly friend".split()
    tok = make_tokenizer([" ".join(words)] * 3)
    rng = random.Random(0)
    long_doc = " ".join(rng.choice(words) for _ in range(20_003))
    docs = ["the cat sees", long_doc, "a dog", " ".join(rng.choice(words) for _ in range(2_000)), "tree"]
    for context_length, max_tokens in ((16, None), (128, None), (17, 9_000)):
        got = [(w.tokens.tolist(), w.mask.tolist()) for w in iter_windows(docs, tok, context_length, max_tokens)]
        assert got == _reference_windows(docs, tok, context_length, max_tokens), (context_length, max_tokens)
