"""Latent attribution: decoder norms, latent scaling and a class for every latent, in one pass."""

from mneme_plugin.attribution.attribute import attribute, delta_histogram, resolve_crosscoder
from mneme_plugin.attribution.classify import CLASSES, classify
from mneme_plugin.attribution.config import AttributionConfig
from mneme_plugin.attribution.decoder_norms import decoder_stats, relative_norm
from mneme_plugin.attribution.latent_scaling import LatentScalingAccumulator, closed_form_betas
from mneme_plugin.attribution.table import (
    COLUMNS,
    AttributionResult,
    format_counts,
    format_delta_histogram,
    load_attribution,
    save_attribution,
)

__all__ = [
    "CLASSES",
    "COLUMNS",
    "AttributionConfig",
    "AttributionResult",
    "LatentScalingAccumulator",
    "attribute",
    "classify",
    "closed_form_betas",
    "decoder_stats",
    "delta_histogram",
    "format_counts",
    "format_delta_histogram",
    "load_attribution",
    "resolve_crosscoder",
    "relative_norm",
    "save_attribution",
]
