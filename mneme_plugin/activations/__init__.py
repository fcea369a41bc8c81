"""Harvesting paired (base, edited) activations, storing them, and reading them back."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.activations.config": ("HarvestConfig",),
    "mneme_plugin.activations.corpus": ("HFDataset", "TokenWindow", "iter_documents", "iter_windows"),
    "mneme_plugin.activations.harvest": ("harvest",),
    "mneme_plugin.activations.models": ("forward_to_hook", "load_model", "validate_pair"),
    "mneme_plugin.activations.normalization": ("NormalizationStats", "estimate_stats", "outlier_keep_mask"),
    "mneme_plugin.activations.manifest": ("FORMAT_NAME", "FORMAT_VERSION", "read_manifest"),
    "mneme_plugin.activations.store": ("ActivationStore",),
    "mneme_plugin.activations.stream": ("HarvestStream", "harvest_stream"),
})
