"""Importing Delphi (``eai-delphi``) without vLLM.

Delphi is optional. Its explainers and scorers import ``delphi.clients.client``, which first runs
``delphi/clients/__init__.py``, which imports ``delphi.clients.offline``, which does
``from vllm import LLM, SamplingParams`` (plus two more vllm imports) at module level. vLLM is a
multi-gigabyte GPU package pinned to one torch version, so on a CPU machine (or whenever torch must
not be replaced) Delphi's explainers would not import at all.

:func:`import_delphi` solves this without touching Delphi itself: when ``vllm`` is not importable,
it installs *temporary* placeholder modules for exactly the names Delphi's import-time code binds
(``vllm.LLM``, ``vllm.SamplingParams``, ``vllm.inputs.TokensPrompt``,
``vllm.distributed.parallel_state.destroy_distributed_environment`` / ``destroy_model_parallel``),
imports ``delphi.clients``, and then removes the placeholders from ``sys.modules`` again, so any
later ``import vllm`` anywhere still fails normally and ``importlib.util.find_spec("vllm")`` still
says it is absent. The placeholders are callables that raise :class:`DelphiUnavailableError` with
an explanation, so Delphi's in-process vLLM client (``Offline``) fails clearly if used; every other
Delphi class (latents, explainers, scorers, the OpenRouter client) is Delphi's real code.

If vLLM *is* installed nothing is stubbed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

from mneme_plugin.errors import MnemeError

_LOCK = threading.Lock()
VLLM_HINT = (
    "vLLM is not installed: Delphi's in-process client (Offline) needs it (`pip install vllm`, on a GPU "
    "machine). Use the OpenAI-compatible client (e.g. against `vllm serve`) or the offline explainer instead."
)

# Module name -> attribute names that Delphi 0.1.x binds from it at import time.
_VLLM_NAMES: dict[str, tuple[str, ...]] = {
    "vllm": ("LLM", "SamplingParams"),
    "vllm.inputs": ("TokensPrompt",),
    "vllm.distributed": (),
    "vllm.distributed.parallel_state": ("destroy_distributed_environment", "destroy_model_parallel"),
}


class DelphiUnavailableError(MnemeError, ImportError):
    """Delphi (or the vLLM part of it) is not installed."""


def _placeholder(qualname: str) -> Any:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise DelphiUnavailableError(f"{qualname} is a placeholder: {VLLM_HINT}")

    unavailable.__name__ = qualname.rsplit(".", 1)[-1]
    unavailable.__qualname__ = qualname
    return unavailable


def delphi_installed() -> bool:
    return importlib.util.find_spec("delphi") is not None and importlib.util.find_spec("delphi.latents") is not None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def import_delphi(module: str = "delphi.clients") -> types.ModuleType:
    """Import a Delphi module (default ``delphi.clients``), stubbing vLLM only during the import."""
    if importlib.util.find_spec("delphi") is None:
        raise DelphiUnavailableError(
            "Delphi is not installed. Install it with `pip install --no-deps eai-delphi==0.1.3` plus its light "
            "dependencies (see the README's autointerp section), or use the offline explainer."
        )
    with _LOCK:
        if "delphi.clients" not in sys.modules and not vllm_installed():
            added: list[str] = []
            try:
                for name, attrs in _VLLM_NAMES.items():
                    mod = types.ModuleType(name, doc=f"mneme_plugin placeholder for {name}: {VLLM_HINT}")
                    mod.__mneme_placeholder__ = True  # type: ignore[attr-defined]
                    for attr in attrs:
                        setattr(mod, attr, _placeholder(f"{name}.{attr}"))
                    sys.modules[name] = mod
                    added.append(name)
                sys.modules["vllm"].inputs = sys.modules["vllm.inputs"]  # type: ignore[attr-defined]
                sys.modules["vllm"].distributed = sys.modules["vllm.distributed"]  # type: ignore[attr-defined]
                sys.modules["vllm.distributed"].parallel_state = sys.modules["vllm.distributed.parallel_state"]  # type: ignore[attr-defined]
                importlib.import_module("delphi.clients")
            finally:
                for name in added:
                    sys.modules.pop(name, None)
        return importlib.import_module(module)


def token_strings(tokenizer: Any, token_ids: Any, **decode_kwargs: Any) -> list[str]:
    """One string per token of ``token_ids`` whose concatenation is the decoded sequence: each token's
    string is what it adds to the decoded text of the tokens before it.

    Decoding tokens one by one (what transformers 4's ``batch_decode`` of one sequence does) loses the
    spaces that word-level and SentencePiece tokenizers put between tokens when decoding ("the", "cat" for
    "the cat"), and Delphi's scorers show ``"".join`` of these strings. A token that ends inside a
    multi-byte character (byte-level BPE) decodes to U+FFFD: it gets "" and the token that completes the
    character gets all of it. Where a tokenizer rewrites earlier text (clean-up of spaces) the token's own
    decoding stands in."""
    ids = [int(t) for t in token_ids]
    prefixes = tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))], **decode_kwargs)
    pieces: list[str] = []
    previous = ""
    for i, text in enumerate(prefixes):
        if text.endswith("\ufffd") and i < len(ids) - 1:
            pieces.append("")
            continue
        own = text[len(previous):] if text.startswith(previous) else tokenizer.decode([ids[i]], **decode_kwargs)
        pieces.append(own)
        previous = text
    return pieces


def _one_sequence(sequences: Any) -> bool:
    if hasattr(sequences, "ndim"):  # a torch tensor or numpy array
        return sequences.ndim == 1
    return isinstance(sequences, (list, tuple)) and (not sequences or isinstance(sequences[0], int))


class PerTokenTokenizer:
    """The tokenizer Delphi is given: ``batch_decode`` of one sequence gives one string per token.

    Delphi 0.1.3 sets each example's ``str_tokens`` (what its explainers highlight with ``<<...>>`` and
    its scorers show) to ``tokenizer.batch_decode(tokens)`` of the example's 1-D tokens. Transformers 4
    decodes that id by id; transformers 5 decodes it as one sequence, one string for the whole window, so
    every prompt wrapped whole windows in ``<<...>>`` or highlighted nothing. This gives Delphi one string
    per token under both (:func:`token_strings`); everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (copy, unpickling): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def batch_decode(self, sequences: Any, *args: Any, **kwargs: Any) -> list[str]:
        if _one_sequence(sequences):
            return token_strings(self.tokenizer, sequences, **kwargs)
        return self.tokenizer.batch_decode(sequences, *args, **kwargs)


def with_non_activating_levels(record: Any) -> Any:
    """``record`` with zero ``normalized_activations`` on its non-activating examples.

    Delphi 0.1.3's ``ContrastiveExplainer`` reads ``normalized_activations`` of the non-activating examples
    to fill in zeros where it is None, but ``NonActivatingExample`` has no such field: every call raised
    AttributeError before asking anything. Zeros are what it means to give them (nothing is highlighted)."""
    for example in record.not_active:
        if getattr(example, "normalized_activations", None) is None:
            example.normalized_activations = example.activations.new_zeros(example.activations.shape)
    return record
