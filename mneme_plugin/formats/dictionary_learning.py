"""Crosscoders trained by ``dictionary_learning.training.trainSAE`` with our ``BatchTopKCrossCoderTrainer``.

``trainSAE`` writes ``<save_dir>/trainer_<i>/config.json`` (``{"trainer": trainer.config, ...}``) and, at the
end, ``ae.pt`` (``torch.save`` of the crosscoder's state dict). The trainer's config names the crosscoder
class and its sizes, the state dict holds every tensor (the inference threshold and activation scale
included), so the folder loads as the crosscoder the trainer trained. The science-of-finetuning trainer's
output (``model_final.pt``, its ``encoder.weight`` names) is ``science_of_finetuning``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mneme_plugin.crosscoder.base import CrossCoder, check_weights
from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.formats.common import load_tensors, read_json

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
# trainer_class values our trainers write (``BatchTopKCrossCoderTrainer.config``).
TRAINERS = ("BatchTopKCrossCoderTrainer", "DistributedBatchTopKCrossCoderTrainer")


def _trainer_config(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    return trainer if isinstance(trainer, dict) else None


def is_trainsae_folder(path: Path) -> bool:
    """A ``trainSAE`` output folder of our trainer (cheap: reads config.json only; never raises)."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name != WEIGHTS_FILE:
        return False
    trainer = _trainer_config(folder)
    return (folder / WEIGHTS_FILE).is_file() and trainer is not None and trainer.get("trainer_class") in TRAINERS


def load_trainsae_output(path: str | Path) -> CrossCoder:
    """The crosscoder a ``trainSAE`` run of ``BatchTopKCrossCoderTrainer`` saved in ``path`` (its ``trainer_<i>``
    folder, or the ``ae.pt`` in it)."""
    from mneme_plugin.crosscoder.config import CrossCoderConfig
    from mneme_plugin.crosscoder.registry import build_crosscoder

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    trainer = read_json(folder / CONFIG_FILE, 'a trainSAE config {"trainer": {...}}').get("trainer") or {}
    name = trainer.get("dict_class")
    try:
        activation_dim, dict_size, k = (int(trainer[key]) for key in ("activation_dim", "dict_size", "k"))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: the trainer config lacks a whole activation_dim, dict_size "
                              f"or k ({err}).") from err
    recorded = trainer.get("metadata")  # the crosscoder's own (models, hook name); trainers of earlier versions: none
    metadata = {**(recorded if isinstance(recorded, dict) else {}),
                **{key: trainer[key] for key in ("layer", "lm_name", "submodule_name") if trainer.get(key) is not None}}
    try:
        config = CrossCoderConfig(activation_dim=activation_dim, dict_size=dict_size,
                                  expansion_factor=max(1, dict_size // activation_dim), k=k,
                                  salience=trainer.get("salience", CrossCoderConfig.salience), metadata=metadata)
        model = build_crosscoder(config)  # the class the trainer builds from this config
    except ConfigError as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} describes no crosscoder our trainer trains: {err}") from err
    if type(model).__name__ != name:
        raise CheckpointError(f"{folder / CONFIG_FILE}: dict_class {name!r} is not the {type(model).__name__} our "
                              "trainer trains.")
    state = load_tensors(folder / WEIGHTS_FILE, f"the state dict of a {name}")
    check_weights(folder / WEIGHTS_FILE, state)  # NaN / inf weights (a diverged run), as every other reader refuses
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit a {name} of {config.dict_size} latents at "
                              f"d={activation_dim}: {str(err).splitlines()[0]}") from err
    return model.eval()
