"""Lazy package exports (the pattern of SPEC 1 / ``lazy_loader``): a package's public names are
imported from their modules on first use, so ``import mneme_plugin`` and ``mneme --help`` do not
pay for torch, transformers and dictionary_learning until a command needs them."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose exported function may share its name with the submodule defining it
    (``sideeffects.evaluate``): when the import system binds that submodule on the package, the
    function is bound instead, as an eager ``from .evaluate import evaluate`` would leave it."""

    _lazy_where: dict[str, str]

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and self.__dict__.get("_lazy_where", {}).get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, exporting each name of ``modules``
    (module path -> names) from its module."""
    where = {name: module for module, names in modules.items() for name in names}
    module_object = sys.modules[package]
    module_object.__class__ = _LazyPackage
    module_object._lazy_where = where

    def __getattr__(name: str) -> Any:
        source = where.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, sorted(where)
