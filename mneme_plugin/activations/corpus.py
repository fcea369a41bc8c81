"""Corpus sources and their packing into fixed-length token windows.

A corpus is any of:

* a list (or tuple, or other collection that can be iterated more than once) of strings (each one
  document) or of dict records (see below). A one-shot iterator (a generator, ``iter(...)``, an
  open file) is refused (``require_reiterable``): a new harvest reads the corpus twice, a
  normalisation estimate over its start and then the harvest from its beginning, and a stream
  reads it once more per epoch (only resuming a store reads it once);
* a path to a local file: ``.txt`` (one document per line; empty lines skipped), ``.jsonl``
  (one JSON record per line), ``.parquet`` (one record per row);
* an :class:`HFDataset` (loaded with ``datasets.load_dataset(..., streaming=True)``).

Records are rendered to text from ``text_field``, or, for conversation corpora (LMSYS-Chat-1M
style), from a ``messages`` / ``conversation`` list of ``{role, content}`` turns through the base
tokenizer's chat template.

Documents are tokenised with the *base* tokenizer (no special tokens added), separated by EOS and
packed into windows of ``context_length`` tokens, each starting with BOS when the tokenizer has
one. The last partial window is right-padded; its pad positions are masked. The order is fully
deterministic, which is what lets an interrupted harvest skip the windows already stored.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from mneme_plugin.errors import ConfigError, EmptyCorpusError


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face dataset, streamed (never fully downloaded)."""

    name: str
    config: str | None = None
    split: str = "train"

    def records(self) -> Iterator[Any]:
        from datasets import load_dataset

        try:
            dataset = load_dataset(self.name, self.config, split=self.split, streaming=True)
        except (ConnectionError, OSError, ValueError) as err:  # unreachable hub, unknown / gated name, bad split
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"Cannot read the Hugging Face dataset {self.describe()}: {first}. Check the name, config and "
                "split, the network, and access (gated sets need `huggingface-cli login`), or give a local "
                ".txt / .jsonl / .parquet file."
            ) from err
        yield from dataset

    def describe(self) -> str:
        return f"hf:{self.name}" + (f"@{self.config}" if self.config else "") + f":{self.split}"


CorpusSource = Union[str, Path, HFDataset, Iterable[Any]]


@dataclass
class TokenWindow:
    """One packed window: ``tokens`` (context_length,), ``mask`` True on real (non-pad) tokens."""

    index: int
    tokens: torch.Tensor
    mask: torch.Tensor


def _spec_read(source: CorpusSource) -> CorpusSource:
    """A string ``hf:NAME[@CONFIG][:SPLIT]`` read as the dataset it names (``corpus_from_spec``), so the Python
    API takes the corpus specs the CLI and YAML take; anything else unchanged."""
    return corpus_from_spec(source) if isinstance(source, str) and source.startswith("hf:") else source


def describe_corpus(source: CorpusSource) -> str:
    """A short human-readable name for the manifest."""
    source = _spec_read(source)
    if isinstance(source, HFDataset):
        return source.describe()
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


_SAMPLE_EDGE = 1 << 20  # bytes hashed at each end of a local corpus file
_SAMPLE_BLOCK, _SAMPLE_BLOCKS = 1 << 16, 16  # and this many evenly spaced blocks in between


def corpus_fingerprint(source: CorpusSource) -> str | None:
    """What identifies the corpus's content (None when it cannot be known: a generator, a missing file).

    Local files: their size and a SHA-256 of the first and last MiB plus 16 evenly spaced 64 KiB blocks
    (the whole file below ~3 MiB). That reads ~3 MiB whatever the size, so checking a store against a
    100 GB corpus stays instant, and it tells apart another file, a truncated or extended one and most
    edits; it is a guard against a mix-up, not against tampering. The modification time is left out on
    purpose: a copied or touched corpus is still the same corpus. Hugging Face datasets: their name,
    config and split. Lists and tuples of records: a SHA-256 of their JSON.
    """
    source = _spec_read(source)
    if isinstance(source, HFDataset):
        return source.describe()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            return None
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with path.open("rb") as fh:
            if size <= 2 * _SAMPLE_EDGE + _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
                digest.update(fh.read())
            else:
                offsets = [0] + [_SAMPLE_EDGE + i * (size - 2 * _SAMPLE_EDGE) // _SAMPLE_BLOCKS
                                 for i in range(_SAMPLE_BLOCKS)] + [size - _SAMPLE_EDGE]
                for offset in offsets:
                    fh.seek(offset)
                    digest.update(fh.read(_SAMPLE_EDGE if offset in (0, size - _SAMPLE_EDGE) else _SAMPLE_BLOCK))
        return f"file:{size}:{digest.hexdigest()[:32]}"
    if isinstance(source, (list, tuple)):
        text = json.dumps(list(source), sort_keys=True, default=str)
        return f"records:{len(source)}:{hashlib.sha256(text.encode()).hexdigest()[:32]}"
    return None


def is_one_shot(source: CorpusSource) -> bool:
    """Whether ``source`` is an iterator (``iter(source) is source``: a generator, ``iter(...)``, ``map``, an open
    file), which a second pass would find spent or half-read."""
    return isinstance(source, Iterator)


def require_reiterable(source: CorpusSource, why: str) -> None:
    """Refuse a one-shot iterator as corpus where it is read more than once (``why`` says where), with a
    ConfigError naming what to give instead: its second pass would silently miss the documents the first took."""
    if is_one_shot(source):
        raise ConfigError(
            f"The corpus is a one-shot iterator ({type(source).__name__}), but {why}: the second pass would miss "
            "the documents the first one consumed. Pass a list of strings or records (e.g. list(...) of it), a "
            ".txt / .jsonl / .parquet file, or HFDataset(name, config, split) (\"hf:NAME[@CONFIG][:SPLIT]\")."
        )


def _first_bad_utf8_line(path: Path) -> int:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 0


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ConfigError:
    return ConfigError(
        f"{path} is not UTF-8 text: line {_first_bad_utf8_line(path)} holds bytes that are not UTF-8 ({err.reason}). "
        f"Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix})."
    )


def iter_records(source: CorpusSource) -> Iterator[Any]:
    """Raw records (strings or dicts) of a corpus source (``hf:NAME[@CONFIG][:SPLIT]`` too), in a fixed order."""
    source = _spec_read(source)
    if isinstance(source, HFDataset):
        yield from source.records()
        return
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"Corpus path {path} is not a file. Pass a .txt/.jsonl/.parquet file, an iterable of "
                "strings, or HFDataset(name, config, split) for a Hugging Face dataset."
            )
        suffix = path.suffix.lower()
        if suffix == ".txt":
            with path.open(encoding="utf-8") as fh:
                try:
                    for line in fh:
                        line = line.rstrip("\n")
                        if line.strip():
                            yield line
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, err) from err
        elif suffix == ".jsonl":
            with path.open(encoding="utf-8") as fh:
                try:
                    for lineno, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as err:
                            raise ConfigError(f"{path}:{lineno} is not valid JSON: {err}") from err
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, err) from err
        elif suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
                batches = pf.iter_batches(batch_size=1024)
                for batch in batches:
                    yield from batch.to_pylist()
            except (pa.ArrowException, OSError) as err:
                raise ConfigError(f"{path} is not a readable parquet file ({err}); check that it is complete.") from err
        else:
            raise ConfigError(f"Unsupported corpus file type {suffix!r} ({path}); use .txt, .jsonl or .parquet.")
        return
    if isinstance(source, Iterable):
        yield from source
        return
    raise ConfigError(f"Unsupported corpus source of type {type(source).__name__}.")


def render_record(
    record: Any, tokenizer: Any, text_field: str = "text", messages_field: str | None = None,
    number: int | None = None,
) -> str | None:
    """Turn one record into text (None to skip it); ``number`` (counted from 1) names it in errors."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise ConfigError(f"Corpus records must be strings or dicts, got {type(record).__name__}.")
    fields = [messages_field] if messages_field else ["messages", "conversation"]
    for field in fields:
        if field in record and record[field] is not None:
            problem = conversation_problem(record[field])
            if problem:
                where = f"Corpus record {number}" if number is not None else "A corpus record"
                sharegpt = isinstance(record[field], (list, tuple)) and any(
                    isinstance(turn, dict) and {"from", "value"} <= set(turn) for turn in record[field])
                raise ConfigError(
                    f"{where}: its chat field {field!r} (messages_field) {problem}; expected a list of "
                    '{"role": ..., "content": ...} dicts, one a turn. Convert the records to that shape'
                    + (' (these are ShareGPT turns: role = "from", content = "value")' if sharegpt else "")
                    + ", or set messages_field to the field that holds such a list (harvest.messages_field, "
                    "HarvestConfig(messages_field=...))."
                )
            return render_conversation(record[field], tokenizer)
    if text_field in record:
        text = record[text_field]
        return text if isinstance(text, str) else None
    raise ConfigError(
        f"Corpus record has none of the fields {[text_field, *fields]}; its keys are {sorted(record)}. "
        "Name the field that holds the text: text_field (messages_field for chat records) in the harvest "
        "section of a --config YAML (collect: collect.harvest), or HarvestConfig(text_field=...) in Python."
    )


def conversation_problem(messages: Any) -> str | None:
    """What keeps ``messages`` from being a chat (a list of ``{role, content}`` turns), in a few words; None if nothing."""
    if not isinstance(messages, (list, tuple)):
        return f"holds a {type(messages).__name__}, not a list"
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            return f"holds a {type(turn).__name__} as turn {i}"
        missing = [key for key in ("role", "content") if key not in turn]
        if missing:
            return f"has a turn {i} without {' and '.join(repr(k) for k in missing)} (its keys: {sorted(turn)})"
    return None


def render_conversation(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """Render a list of ``{role, content}`` turns with the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            "The corpus holds conversations but the base tokenizer has no chat template; "
            "use a chat model's tokenizer or render the conversations to text first."
        )
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(turns, tokenize=False)


def iter_documents(
    source: CorpusSource, tokenizer: Any, text_field: str = "text", messages_field: str | None = None
) -> Iterator[str]:
    for number, record in enumerate(iter_records(source), 1):
        text = render_record(record, tokenizer, text_field, messages_field, number)
        if text:
            yield text


def _chunks(it: Iterator[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in it:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding (pad, else EOS, else 0: pad positions are masked anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def pack_tokens(tokenizer: Any, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Documents as BOS-prefixed token streams, packed into (n, context_length) rows (the training
    data of the organism and of the interventions that fine-tune it). A tokenizer without BOS (the
    Qwen family's) prefixes nothing, as in ``iter_windows``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(prefix + tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // context_length
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one window of {context_length}.")
    return torch.tensor(ids[: n * context_length]).view(n, context_length)


def iter_windows(
    source: CorpusSource,
    tokenizer: Any,
    context_length: int,
    max_tokens: int | None = None,
    text_field: str = "text",
    messages_field: str | None = None,
    append_eos: bool = True,
) -> Iterator[TokenWindow]:
    """Pack the corpus into windows (deterministic). Raises EmptyCorpusError if none result."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    pad = pad_token_id(tokenizer)
    body = context_length - (1 if bos is not None else 0)
    max_windows = None if max_tokens is None else -(-max_tokens // context_length)
    buffer: list[int] = []
    n_windows = 0

    def make(ids: list[int]) -> TokenWindow:
        prefix = [bos] if bos is not None else []
        real = prefix + ids
        tokens = torch.full((context_length,), pad, dtype=torch.long)
        tokens[: len(real)] = torch.tensor(real, dtype=torch.long)
        mask = torch.zeros(context_length, dtype=torch.bool)
        mask[: len(real)] = True
        return TokenWindow(n_windows, tokens, mask)

    docs = iter_documents(source, tokenizer, text_field, messages_field)
    for chunk in _chunks(docs, 64):
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            buffer.extend(ids)
            if eos is not None:
                buffer.append(eos)
            # Windows are read at an offset and the buffer cut once a document: cutting it per window
            # (buffer = buffer[body:]) copied the rest of a long document each time, quadratic in its length.
            start = 0
            while len(buffer) - start >= body:
                if max_windows is not None and n_windows >= max_windows:
                    return
                yield make(buffer[start:start + body])
                n_windows += 1
                start += body
            del buffer[:start]
    if buffer and (max_windows is None or n_windows < max_windows):
        yield make(buffer)
        n_windows += 1
    if n_windows == 0:
        raise EmptyCorpusError(
            f"The corpus {describe_corpus(source)} yielded no tokens: check that it is not empty and "
            "that its records have the configured text/messages field."
        )


def batch_windows(windows: Iterator[TokenWindow], batch_size: int) -> Iterator[list[TokenWindow]]:
    batch: list[TokenWindow] = []
    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")


def local_corpus_problem(path: str | os.PathLike[str]) -> str | None:
    """What makes a local corpus file unusable, seen without reading it through (None when fine): it
    is missing or no file, its type is not one ``iter_records`` reads, or it is empty (no byte but
    whitespace). Checked before a run starts, so a run does not fail at the harvest, after an
    intervention of hours."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        return f"{path} is {what}: give a .txt / .jsonl / .parquet file or hf:NAME[@CONFIG][:SPLIT]."
    if path.suffix.lower() not in CORPUS_SUFFIXES:
        return (f"{path} has the unsupported file type {path.suffix or '(none)'!r}: a corpus is a .txt (one "
                "document a line), .jsonl (a record a line, with a text or messages field) or .parquet file.")
    size = path.stat().st_size
    if size == 0 or (size < 2**20 and not path.read_bytes().strip()):
        return f"{path} is empty: the corpus needs text to read activations from."
    return None


def corpus_from_spec(spec: str) -> CorpusSource:
    """Parse a corpus given on the command line: a local file, or ``hf:NAME[@CONFIG][:SPLIT]``.

    The inverse of ``HFDataset.describe``, e.g. ``hf:monology/pile-uncopyrighted:train`` or
    ``hf:wikitext@wikitext-2-raw-v1:train``.
    """
    if not spec.startswith("hf:"):
        return Path(spec)
    body, _, split = spec[3:].partition(":")
    name, _, config = body.partition("@")
    if not name:
        raise ConfigError(f"Corpus {spec!r}: expected hf:NAME[@CONFIG][:SPLIT], e.g. hf:monology/pile-uncopyrighted.")
    return HFDataset(name, config or None, split or "train")
