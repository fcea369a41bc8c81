"""``load_crosscoder``: any supported crosscoder, local or on the hub, as a ``BatchTopKCrossCoder``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from mneme_plugin.crosscoder.model import CONFIG_FILE, FORMAT_NAME, BatchTopKCrossCoder
from mneme_plugin.errors import CheckpointError
from mneme_plugin.formats import kissane, saelens, science_of_finetuning
from mneme_plugin.formats.common import download_from_hub, load_tensors, looks_like_hub_id

FORMATS = ("mneme", "saelens", "kissane", "science-of-finetuning")
EXPECTED_FILES = (
    "config.json + model.safetensors (mneme, or science-of-finetuning hub layout with trainer_config.json), "
    "model_final.pt / checkpoint_<step>.pt (science-of-finetuning training output), cfg.json + cc_weights.pt "
    "(Kissane), cfg.json + sae_weights.safetensors (a mneme SAE-Lens export)"
)


def _is_mneme(folder: Path) -> bool:
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """The format of a local folder or weights file (one of ``FORMATS``), or None if unrecognised."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file() and _is_mneme(path):
            return "mneme"
        if saelens.is_saelens_folder(path):
            return "saelens"
        if (path / kissane.WEIGHTS_FILE).is_file():
            return "kissane"
        if science_of_finetuning.find_weights(path) is not None:
            return "science-of-finetuning"
        return None
    if path.is_file():
        if path.name == saelens.WEIGHTS_FILE:
            return "saelens"
        if path.name == kissane.WEIGHTS_FILE:
            return "kissane"
        if path.name == "model.safetensors" and _is_mneme(path.parent):
            return "mneme"
        if path.suffix in (".pt", ".pth", ".safetensors"):
            keys = load_tensors(path, "crosscoder weights").keys()
            if any(k.endswith("encoder.weight") for k in keys):
                return "science-of-finetuning"
            if {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(keys):
                return "kissane"
    return None


def _candidates(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and detect_format(p) is not None)


def load_crosscoder(
    source: str | os.PathLike[str],
    *,
    format: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    scale_factors: Sequence[float] | None = None,
    device: str | None = None,
) -> BatchTopKCrossCoder:
    """Load a crosscoder of any supported format, from a local path or a hub id, as a ``BatchTopKCrossCoder``.

    ``source``: a folder or weights file (a training run directory means its ``crosscoder/``); or a hub id ``org/name`` (``org/name/sub/folder`` or
    ``subfolder=`` for repos with one folder per hook), downloaded with huggingface_hub.
    ``format``: force one of ``FORMATS`` instead of detecting it. ``scale_factors``: the per-model
    input scale factors (base, edited) of a Kissane crosscoder, which that format does not store.
    The result encodes (B, 2, d) raw activations as the original code does; see ``formats`` docs.
    """
    if format is not None and format not in FORMATS:
        raise CheckpointError(f"Unknown crosscoder format {format!r}; expected one of {FORMATS}.")
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_hub_id(str(source)):
            path = download_from_hub(str(source), subfolder=subfolder, revision=revision)
            subfolder = None
        else:
            raise CheckpointError(f"{source} does not exist (and is not a hub id org/name).")
    if subfolder:
        path = path / subfolder
        if not path.exists():
            raise CheckpointError(f"{path} does not exist.")
    if (path / "crosscoder" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "crosscoder"  # a training run directory: its final crosscoder
    fmt = format or detect_format(path)
    if fmt is None and path.is_dir():
        found = _candidates(path)
        if len(found) == 1:
            path = found[0]
            fmt = detect_format(path)
        elif len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"{path} holds several crosscoders ({names}); pick one with subfolder= (CLI: --subfolder)."
            )
    if fmt is None:
        raise CheckpointError(f"{path} is not a crosscoder this package can read; expected {EXPECTED_FILES}.")
    if scale_factors is not None and fmt != "kissane":
        raise CheckpointError(
            f"scale_factors are only for Kissane crosscoders (which do not store them); {path} is {fmt}."
        )
    if fmt == "mneme":
        model = BatchTopKCrossCoder.from_pretrained(path if path.is_dir() else path.parent)
    elif fmt == "saelens":
        model = saelens.load_saelens_export(path if path.is_dir() else path.parent)
    elif fmt == "kissane":
        model = kissane.load_kissane(path, scale_factors=scale_factors)
    else:
        model = science_of_finetuning.load_science_of_finetuning(path)
    if device is not None:
        model = model.to(device)
    return model.eval()


def import_crosscoder(source: str | os.PathLike[str], out_dir: str | os.PathLike[str], **kwargs) -> Path:
    """Load ``source`` (see ``load_crosscoder``) and save it in this package's own format to ``out_dir``."""
    return load_crosscoder(source, **kwargs).save_pretrained(out_dir)
