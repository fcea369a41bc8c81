"""Shipped YAML presets (``mneme_plugin/data/presets/*.yaml``), loadable by name.

A preset is a mapping whose keys are the fields of one config dataclass (e.g. ``zephyr_rmu`` for
:class:`~mneme_plugin.interventions.hf_rmu.HFRMUConfig`); a user's YAML overrides its keys, those of its
nested mappings one by one (``merged_config``). Its
``kind`` key names that config (``PRESET_KINDS``) and its ``description`` says what it reproduces;
both are dropped when it is loaded.
"""

from __future__ import annotations

import difflib
from importlib import resources
from typing import Any

import yaml

from mneme_plugin.errors import ConfigError

# kind -> the command that reads such a preset, and where a run config names it.
PRESET_KINDS: dict[str, str] = {
    "rmu": "`mneme intervene rmu` (in a run: intervention: {kind: rmu, preset: NAME})",
    "sft": "`mneme intervene sft` (in a run: intervention: {kind: sft, preset: NAME})",
    "lm_eval": "`mneme groundtruth lm-eval` (in a run: ground_truth.tables.TABLE.lm_eval: {preset: NAME})",
    "judge": "`mneme groundtruth judge` (in a run: ground_truth.tables.TABLE.judge: {preset: NAME})",
}


def _folder() -> Any:
    return resources.files("mneme_plugin") / "data" / "presets"


def _read(name: str) -> dict[str, Any]:
    return yaml.safe_load((_folder() / f"{name}.yaml").read_text(encoding="utf-8")) or {}


def list_presets(kind: str | None = None) -> list[str]:
    """The shipped presets' names; with ``kind``, those of that kind only."""
    names = sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))
    return names if kind is None else [n for n in names if preset_kind(n) == kind]


def preset_kind(name: str) -> str:
    """The ``PRESET_KINDS`` entry of the shipped preset ``name``."""
    return str(_read(name).get("kind"))


def load_preset(name: str, kind: str | None = None) -> dict[str, Any]:
    """The mapping of preset ``name`` (without ``.yaml``); its ``description`` and ``kind`` keys are dropped.
    ``kind``: the config it must be for (a preset of another kind is refused, naming where it belongs)."""
    if name not in list_presets():  # the folder's names: the presets of a kind are read only for a message
        known = list_presets(kind)
        close = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(f"Unknown preset {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; shipped presets{'' if kind is None else ' of this kind'}: {', '.join(known)}"
                          + " (`mneme intervene presets` describes them).")
    data = _read(name)
    data.pop("description", None)
    own = str(data.pop("kind", None))
    if kind is not None and own != kind:
        raise ConfigError(f"Preset {name!r} is for {PRESET_KINDS[own]}, not for {PRESET_KINDS[kind]}; the presets "
                          f"for the latter: {', '.join(list_presets(kind))}.")
    return data


def merged_config(preset: str | None, overrides: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """A preset's mapping (or {}) with ``overrides`` applied key by key, into nested mappings too
    (``merged``); ``kind`` as in ``load_preset``."""
    return merged(load_preset(preset, kind) if preset else {}, overrides)


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied: where both hold a mapping under one key, the two merge key by key
    (recursively); any other value (a list, a scalar, null) replaces ``base``'s. An override names what it
    changes: ``judge: {base_url: URL}`` over a judge preset keeps the preset's client kind, model and key, and
    ``generator: {max_new_tokens: 256}`` its vllm generator and sampling (replacing the whole mapping gave the
    client's and generator's defaults: no judge, the hf generator). Keys unknown to a section are refused
    where the merged mapping is read (``ConfigMixin.from_dict``, naming section.key)."""
    out = dict(base)
    for key, value in overrides.items():
        old = out.get(key)
        out[key] = merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def preset_description(name: str) -> str:
    """A preset's ``description`` on one line (empty if none)."""
    return " ".join(str(_read(name).get("description") or "").split())


def preset_text(name: str) -> str:
    """The shipped preset's YAML as it is on disk (``mneme intervene presets NAME``)."""
    load_preset(name)  # an unknown name is refused with suggestions
    return (_folder() / f"{name}.yaml").read_text(encoding="utf-8")
