"""``load_crosscoder``: any registered crosscoder format, local or on the hub, as a ``CrossCoder``.

Formats live in ``FORMAT_REGISTRY``; ``register_format(name, detect, load)`` adds one without editing
this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

from mneme_plugin.crosscoder.base import CONFIG_FILE, FORMAT_NAME, WEIGHTS_FILE, CrossCoder
from mneme_plugin.errors import CheckpointError
from mneme_plugin.files import refuse_overwrite
from mneme_plugin.formats import dictionary_learning, kissane, saelens, science_of_finetuning
from mneme_plugin.formats.common import download_from_hub, load_tensors, looks_like_hub_id

Detector = Callable[[Path], bool]
Loader = Callable[..., CrossCoder]


@dataclass(frozen=True)
class CrossCoderFormat:
    """An import format: ``detect(path)`` says whether a local folder or file is one; ``load(path, **options)``
    reads it as a ``CrossCoder``. ``options``: the keyword options of ``load_crosscoder`` it takes (the
    others are refused); ``expected``: the files it reads, and ``title`` its name in prose, for errors."""

    name: str
    detect: Detector
    load: Loader
    options: tuple[str, ...] = ()
    expected: str = ""
    title: str = ""


# Tried in registration order: the built-ins first (registered at the end of this module), then yours.
FORMAT_REGISTRY: dict[str, CrossCoderFormat] = {}


def register_format(name: str, detect: Detector, load: Loader, *, options: Sequence[str] = (),
                    expected: str = "", title: str = "") -> CrossCoderFormat:
    """Make ``load_crosscoder`` (and every stage that loads through it) read a new crosscoder format.

    ``detect(path: Path) -> bool`` must be cheap and must not raise on foreign files; ``load(path, **options)``
    returns a ``CrossCoder`` (any registered architecture). ``options`` names the ``load_crosscoder``
    keywords it accepts (e.g. ``("scale_factors",)``).
    """
    if name in FORMAT_REGISTRY:
        raise ValueError(f"A crosscoder format named {name!r} is already registered.")
    fmt = CrossCoderFormat(name, detect, load, tuple(options), expected or name, title or name)
    FORMAT_REGISTRY[name] = fmt
    return fmt


def expected_files() -> str:
    return ", ".join(fmt.expected for fmt in FORMAT_REGISTRY.values())


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """The name of the first registered format that recognises a local folder or weights file, or None."""
    path = Path(path)
    for fmt in FORMAT_REGISTRY.values():
        if fmt.detect(path):
            return fmt.name
    return None


# ------------------------------------------------------------------------------- built-in formats


def _is_mneme(folder: Path) -> bool:
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _detect_mneme(path: Path) -> bool:
    if path.is_dir():
        return (path / CONFIG_FILE).is_file() and _is_mneme(path)
    return path.is_file() and path.name == WEIGHTS_FILE and _is_mneme(path.parent)


def _detect_saelens(path: Path) -> bool:
    return saelens.is_saelens_folder(path) if path.is_dir() else path.is_file() and path.name == saelens.WEIGHTS_FILE


TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors")


def _tensor_keys(path: Path) -> set[str]:
    """The tensor names of a weights file; none for a file that is not a readable mapping of names to tensors
    (a detector must not raise on foreign files: a format registered later may read them)."""
    if not (path.is_file() and path.suffix in TENSOR_SUFFIXES):
        return set()
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # the header only
                return set(f.keys())
        return set(load_tensors(path, "crosscoder weights", mapped=True))
    except Exception:  # noqa: BLE001  (corrupt or foreign: torch / safetensors raise many error types)
        return set()


def _detect_kissane(path: Path) -> bool:
    if path.is_dir():
        return (path / kissane.WEIGHTS_FILE).is_file()
    if path.is_file() and path.name == kissane.WEIGHTS_FILE:
        return True
    keys = _tensor_keys(path)
    return not any(k.endswith("encoder.weight") for k in keys) and {"W_enc", "W_dec", "b_enc", "b_dec"} <= keys


def _detect_science_of_finetuning(path: Path) -> bool:
    if path.is_dir():
        from mneme_plugin.activations.models import is_hf_model_config

        # A Hugging Face model folder has a model.safetensors too: its config.json names a model_type, and it
        # has no trainer_config.json.
        hf_model = is_hf_model_config(path / "config.json") and not (path / "trainer_config.json").is_file()
        return science_of_finetuning.find_weights(path) is not None and not hf_model
    return any(k.endswith("encoder.weight") for k in _tensor_keys(path))


register_format(
    "mneme", _detect_mneme, lambda path: CrossCoder.from_pretrained(_folder_of(path)),
    expected="config.json + model.safetensors (mneme)",
)
register_format(
    "saelens", _detect_saelens, lambda path: saelens.load_saelens_export(_folder_of(path)),
    expected="cfg.json + sae_weights.safetensors (a mneme SAE-Lens export)", title="mneme SAE-Lens export",
)
register_format(
    "dictionary-learning", dictionary_learning.is_trainsae_folder, dictionary_learning.load_trainsae_output,
    expected="config.json + ae.pt (dictionary_learning's trainSAE with BatchTopKCrossCoderTrainer)",
    title="trainSAE output",
)
register_format(
    "kissane", _detect_kissane, kissane.load_kissane, options=("scale_factors",),
    expected="cfg.json + cc_weights.pt (Kissane)", title="Kissane",
)
register_format(
    "science-of-finetuning", _detect_science_of_finetuning, science_of_finetuning.load_science_of_finetuning,
    expected=("model.safetensors + config.json + trainer_config.json (science-of-finetuning hub layout), "
              "model_final.pt / checkpoint_<step>.pt (their training output)"),
)
# The built-in format names (FORMAT_REGISTRY also holds the ones registered later).
FORMATS = tuple(FORMAT_REGISTRY)


def _candidates(folder: Path) -> list[Path]:
    """The crosscoders in ``folder``'s subfolders; an SAE-Lens export's per-model views (``<hook>__base``,
    ``<hook>__edited``: one model's half each, which no crosscoder loader takes) left out beside their joint folder."""
    found = sorted(p for p in folder.iterdir() if p.is_dir() and detect_format(p) is not None)
    views = {p for p in found for suffix in saelens.VIEW_SUFFIX.values()
             if p.name.endswith(suffix) and folder / p.name[: -len(suffix)] in found}
    return [p for p in found if p not in views]


def load_crosscoder(
    source: str | os.PathLike[str],
    *,
    format: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    scale_factors: Sequence[float] | None = None,
    device: str | None = None,
) -> CrossCoder:
    """Load a crosscoder of any registered format, from a local path or a hub id, as a ``CrossCoder``.

    ``source``: a folder or weights file (a training run directory means its ``crosscoder/``, a ``mneme run`` directory its ``crosscoder_run/crosscoder/``); or a hub id ``org/name`` (``org/name/sub/folder`` or
    ``subfolder=`` for repos with one folder per hook), downloaded with huggingface_hub.
    ``format``: force one of ``FORMAT_REGISTRY`` instead of detecting it. ``scale_factors``: the per-model
    input scale factors (base, edited) of a Kissane crosscoder, which that format does not store.
    The result encodes (B, 2, d) raw activations as the original code does; see ``formats`` docs.
    """
    if format is not None and format not in FORMAT_REGISTRY:
        raise CheckpointError(f"Unknown crosscoder format {format!r}; expected one of {tuple(FORMAT_REGISTRY)}.")
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
    if not (path / CONFIG_FILE).is_file():
        from mneme_plugin.crosscoder.files import FINAL_DIR
        from mneme_plugin.layout import RunLayout

        # A training run directory means its final crosscoder; a `mneme run` directory, its run's.
        for final in (path / FINAL_DIR, RunLayout(path).crosscoder_run / FINAL_DIR):
            if (final / CONFIG_FILE).is_file():
                path = final
                break
    fmt = format or detect_format(path)
    if fmt is None and path.is_dir():
        found = _candidates(path)
        if len(found) == 1:
            path = found[0]
            fmt = detect_format(path)
        elif len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"{path} holds several crosscoders ({names}); give one of them ({path / found[-1].name}, say), "
                "or subfolder= (`mneme import` / `export saelens`: --subfolder)."
            )
    if fmt is None and path.is_file() and path.suffix in TENSOR_SUFFIXES:
        load_tensors(path, "crosscoder weights")  # an unreadable file or foreign content: the error names why
    if fmt is None:
        from mneme_plugin.describe import folder_kind

        kind = folder_kind(path)
        if kind:
            raise CheckpointError(f"{path} is not a crosscoder: it is {kind}.")
        raise CheckpointError(f"{path} is not a crosscoder this package can read; expected {expected_files()}.")
    chosen = FORMAT_REGISTRY[fmt]
    given = {"scale_factors": scale_factors}
    options = {name: value for name, value in given.items() if value is not None}
    for name in options:
        if name not in chosen.options:
            takers = [f.title for f in FORMAT_REGISTRY.values() if name in f.options]
            raise CheckpointError(
                f"{name} is only for {' / '.join(takers)} crosscoders (which do not store it); {path} is {fmt}."
            )
    model = chosen.load(path, **options)
    if not isinstance(model, CrossCoder):
        raise CheckpointError(f"The {fmt!r} format's loader returned a {type(model).__name__}, not a CrossCoder.")
    if device is not None:
        model = model.to(device)
    return model.eval()


def import_crosscoder(source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, force: bool = False,
                      **kwargs) -> Path:
    """Load ``source`` (see ``load_crosscoder``) and save it in this package's own format to ``out_dir``.

    A crosscoder already in ``out_dir`` is refused (OutputExistsError) unless ``force``; it is
    checked before ``source`` is read, so a refusal costs nothing.
    """
    refuse_overwrite([Path(out_dir) / CONFIG_FILE, Path(out_dir) / WEIGHTS_FILE], force)
    return load_crosscoder(source, **kwargs).save_pretrained(out_dir)
