"""What a crosscoder records about the activations it was trained on, and the check that a later
stage reads the same ones.

A trained crosscoder's ``config.metadata`` names the layer, the hook and both models of its
activation store. Its latents mean nothing at another hook, so ``collect`` reads at the recorded
hook by default and ``attribute`` refuses a store of another hook or model pair, unless the user
overrides that explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mneme_plugin.errors import ConfigError

HOOK_KEYS = ("layer", "hook_name")
SOURCE_KEYS = HOOK_KEYS + ("base_model", "edited_model")


def recorded_source(crosscoder: Any) -> dict[str, Any]:
    """The recorded layer / hook / models of ``crosscoder`` (only the keys it has)."""
    meta = getattr(getattr(crosscoder, "cfg", None), "metadata", None) or {}
    return {key: meta[key] for key in SOURCE_KEYS if meta.get(key) is not None}


def recorded_reading(crosscoder: Any) -> dict[str, Any]:
    """How to read a corpus the way the crosscoder's activations were read: its recorded layer, and its
    hook and window length (tokens) where it records them (``HarvestConfig`` fields). ConfigError when
    it records no layer (an imported crosscoder, say)."""
    meta = getattr(getattr(crosscoder, "cfg", None), "metadata", None) or {}
    layer = meta.get("layer")
    if layer is None:
        layer = layer_of_hook(meta.get("hook_name"))  # a Kissane crosscoder records its hook point only
    if layer is None:
        raise ConfigError("The crosscoder does not record the layer it was trained at (an imported crosscoder?): "
                          "give the layer to read (collect.harvest.layer, CLI --layer).")
    reading: dict[str, Any] = {"layer": int(layer), "hook_name": meta.get("hook_name")}
    if meta.get("context_length"):
        reading["context_length"] = int(meta["context_length"])
    return reading


def layer_of_hook(hook_name: Any) -> int | None:
    """The block index of a TransformerLens hook name inside a block (``blocks.14.hook_resid_pre`` -> 14);
    None for any other name."""
    match = re.fullmatch(r"blocks\.(\d+)\.[\w.]+", hook_name) if isinstance(hook_name, str) else None
    return int(match.group(1)) if match else None


def source_mismatches(recorded: Mapping[str, Any], actual: Mapping[str, Any],
                      keys: tuple[str, ...] = SOURCE_KEYS) -> list[str]:
    """``key: recorded vs actual`` for every key both sides know and that differs."""
    return [f"{key} {recorded[key]!r} (crosscoder) vs {actual[key]!r}" for key in keys
            if recorded.get(key) is not None and actual.get(key) is not None and recorded[key] != actual[key]]


def check_same_source(crosscoder: Any, actual: Mapping[str, Any], *, what: str, override: str,
                      keys: tuple[str, ...] = SOURCE_KEYS, allow: bool = False) -> None:
    """Refuse ``actual`` (a store manifest, a reading config) when it differs from what the
    crosscoder records, unless ``allow``; ``override`` names the option that allows it."""
    differences = source_mismatches(recorded_source(crosscoder), actual, keys)
    if differences and not allow:
        raise ConfigError(
            f"The crosscoder was trained on other activations than {what}: {'; '.join(differences)}. "
            f"Use the activations it was trained on, or pass {override} if this is intended."
        )


def check_model_pair(crosscoder: Any, base: Any, edited: Any, *, what: str) -> None:
    """Refuse a base and an edited model given the other way round from the crosscoder's records (its
    decoders and per-model normalisation would then read each model as the other); warn when a model
    is not the one it records (another spelling of the same weights is fine, other weights are not)."""
    import logging

    from mneme_plugin.activations.models import model_name, same_model

    recorded = recorded_source(crosscoder)
    rec_base, rec_edited = recorded.get("base_model"), recorded.get("edited_model")
    if rec_base is None or rec_edited is None:
        return
    names = [m if isinstance(m, str) else model_name(m) for m in (base, edited)]
    if (same_model(names[0], rec_edited) and same_model(names[1], rec_base)
            and not same_model(rec_base, rec_edited)):
        raise ConfigError(
            f"The base and edited models of {what} are swapped: the crosscoder was trained with base {rec_base!r} "
            f"and edited {rec_edited!r}, given base {names[0]!r} and edited {names[1]!r}. Give them the other way "
            "round (--base / --edited, models.base / models.edited)."
        )
    for role, name, rec in (("base", names[0], rec_base), ("edited", names[1], rec_edited)):
        if not same_model(name, rec):
            logging.getLogger("mneme_plugin").warning(
                "The %s model of %s is %r, the crosscoder was trained with %r: its latents are read on another "
                "model than the one they were learnt on, unless both name the same weights.", role, what, name, rec)
