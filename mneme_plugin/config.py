"""Shared machinery of the dataclass configs: strict ``to_dict`` / ``from_dict`` and YAML I/O.

Every component has a dataclass config that maps one-to-one onto a YAML mapping. Unknown keys are
refused with the list of known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mneme_plugin.errors import ConfigError

T = TypeVar("T", bound="ConfigMixin")


class ConfigMixin:
    """Mixin for dataclass configs: strict dict / YAML round-trips."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, ConfigMixin):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"Unknown key(s) for {cls.__name__}: {', '.join(hints)}. "
                f"Known keys: {', '.join(sorted(known))}."
            )
        return cls(**data)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(read_yaml_mapping(path))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is an empty mapping), with clear errors."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"Config file {path} does not exist.") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {type(data).__name__}.")
    return data


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (used in ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)
