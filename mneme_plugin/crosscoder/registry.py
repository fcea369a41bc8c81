"""Registry of crosscoder classes by ``architecture`` (the key of a saved ``config.json``), SAE-Lens style.

The built-in classes register themselves at the end of their modules (``model``, ``imported``), which
``get_crosscoder_class`` imports first; register your own ``CrossCoder`` subclass with
``register_crosscoder_class(architecture, cls)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mneme_plugin.errors import ConfigError

if TYPE_CHECKING:  # avoid circular imports
    from mneme_plugin.crosscoder.base import CrossCoder
    from mneme_plugin.crosscoder.config import CrossCoderConfig

CROSSCODER_CLASS_REGISTRY: dict[str, "type[CrossCoder]"] = {}


def register_crosscoder_class(architecture: str, crosscoder_class: "type[CrossCoder]") -> None:
    if architecture in CROSSCODER_CLASS_REGISTRY:
        raise ValueError(f"A crosscoder class for architecture {architecture!r} is already registered.")
    if crosscoder_class.architecture != architecture:
        raise ValueError(
            f"{crosscoder_class.__name__}.architecture is {crosscoder_class.architecture!r}, not {architecture!r}."
        )
    CROSSCODER_CLASS_REGISTRY[architecture] = crosscoder_class


def _import_builtins() -> None:
    import mneme_plugin.crosscoder.imported  # noqa: F401
    import mneme_plugin.crosscoder.model  # noqa: F401


def get_crosscoder_class(architecture: str) -> "type[CrossCoder]":
    _import_builtins()
    try:
        return CROSSCODER_CLASS_REGISTRY[architecture]
    except KeyError:
        raise ConfigError(
            f"Unknown crosscoder architecture {architecture!r}; registered: {sorted(CROSSCODER_CLASS_REGISTRY)} "
            "(register a CrossCoder subclass with register_crosscoder_class)."
        ) from None


def architecture_of(config: "CrossCoderConfig | Any") -> str:
    """The built-in architecture a config's flags describe (for files saved before the ``architecture`` key)."""
    if getattr(config, "salience", None) == "decoupled":
        return "batchtopk_decoupled"
    return str(getattr(config, "sparsity", "batchtopk"))


def build_crosscoder(config: "CrossCoderConfig", architecture: str | None = None) -> "CrossCoder":
    """A fresh crosscoder of ``architecture`` (default: the one the config's flags describe)."""
    return get_crosscoder_class(architecture or architecture_of(config))(config)
