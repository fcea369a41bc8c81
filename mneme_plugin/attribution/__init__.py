"""Latent attribution: decoder norms, latent scaling and a class for every latent, in one pass."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.attribution.attribute": ("attribute", "delta_histogram", "resolve_crosscoder"),
    "mneme_plugin.attribution.classify": ("classify",),
    "mneme_plugin.attribution.config": ("CLASSES", "AttributionConfig"),
    "mneme_plugin.attribution.decoder_norms": ("decoder_stats", "relative_norm"),
    "mneme_plugin.attribution.latent_scaling": ("LatentScalingAccumulator", "closed_form_betas"),
    "mneme_plugin.attribution.table": (
        "COLUMNS",
        "AttributionResult",
        "format_counts",
        "format_delta_histogram",
        "load_attribution",
        "save_attribution",
    ),
})
