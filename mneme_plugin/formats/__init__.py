"""Interoperability: SAE-Lens export, and the crosscoders others published.

* ``export_saelens(crosscoder, out_dir)``: jumprelu SAE-Lens folders (concat + optional per-model views).
* ``load_crosscoder(path_or_hub_id)``: our format, our SAE-Lens exports, science-of-finetuning
  (hub layout and training output, BatchTopK and L1, every code normalisation) and Kissane
  crosscoders, each as a ``CrossCoder`` (the class its architecture needs) that encodes as the original
  code does; ``register_format(name, detect, load)`` adds a format.
* ``import_crosscoder(source, out_dir)``: the same, saved in our own format.
"""

from mneme_plugin.formats.kissane import load_kissane
from mneme_plugin.formats.load import (
    FORMAT_REGISTRY,
    FORMATS,
    CrossCoderFormat,
    detect_format,
    import_crosscoder,
    load_crosscoder,
    register_format,
)
from mneme_plugin.formats.saelens import export_saelens, load_saelens_export
from mneme_plugin.formats.science_of_finetuning import load_science_of_finetuning

__all__ = [
    "FORMAT_REGISTRY",
    "FORMATS",
    "CrossCoderFormat",
    "detect_format",
    "export_saelens",
    "import_crosscoder",
    "load_crosscoder",
    "load_kissane",
    "load_saelens_export",
    "load_science_of_finetuning",
    "register_format",
]
