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
