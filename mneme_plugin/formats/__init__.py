"""Interoperability: SAE-Lens export, and the crosscoders others published.

* ``export_saelens(crosscoder, out_dir)``: jumprelu SAE-Lens folders (concat + optional per-model views).
* ``load_crosscoder(path_or_hub_id)``: our format, our SAE-Lens exports, science-of-finetuning
  (hub layout and training output, BatchTopK and L1, every code normalisation) and Kissane
  crosscoders, each as a ``BatchTopKCrossCoder`` that encodes as the original code does.
* ``import_crosscoder(source, out_dir)``: the same, saved in our own format."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.formats.kissane": ("load_kissane",),
    "mneme_plugin.formats.load": ("FORMATS", "detect_format", "import_crosscoder", "load_crosscoder"),
    "mneme_plugin.formats.saelens": ("export_saelens", "load_saelens_export"),
    "mneme_plugin.formats.science_of_finetuning": ("load_science_of_finetuning",),
})
