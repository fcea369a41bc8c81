"""Shipped YAML presets (``mneme_plugin/data/presets/*.yaml``), loadable by name.

A preset is a mapping whose keys are the fields of one config dataclass (e.g. ``zephyr_rmu`` for
:class:`~mneme_plugin.interventions.hf_rmu.HFRMUConfig`); a user's YAML overrides its keys.
"""

from __future__ import annotations

import difflib
from importlib import resources
from typing import Any

import yaml

from mneme_plugin.errors import ConfigError



def _folder() -> Any:
    return resources.files("mneme_plugin") / "data" / "presets"


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The mapping of preset ``name`` (without ``.yaml``); its ``description`` key is dropped."""
    known = list_presets()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(f"Unknown preset {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; shipped presets: {', '.join(known)}.")
    text = (_folder() / f"{name}.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    data.pop("description", None)
    return data


def merged_config(preset: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's mapping (or {}) with ``overrides`` applied key by key."""
    return {**(load_preset(preset) if preset else {}), **overrides}


def preset_description(name: str) -> str:
    """A preset's ``description``, cut to one line (empty if none)."""
    text = (_folder() / f"{name}.yaml").read_text(encoding="utf-8")
    description = (yaml.safe_load(text) or {}).get("description") or ""
    description = " ".join(description.split())
    return description if len(description) <= 100 else description[:97] + "..."
