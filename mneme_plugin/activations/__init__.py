"""Harvesting paired (base, edited) activations, storing them, and reading them back."""

from mneme_plugin.activations.config import HarvestConfig
from mneme_plugin.activations.corpus import HFDataset, TokenWindow, iter_documents, iter_windows
from mneme_plugin.activations.harvest import harvest
from mneme_plugin.activations.models import forward_to_hook, load_model, validate_pair
from mneme_plugin.activations.normalization import NormalizationStats, estimate_stats, outlier_keep_mask
from mneme_plugin.activations.store import FORMAT_NAME, FORMAT_VERSION, ActivationStore, read_manifest
from mneme_plugin.activations.stream import HarvestStream, harvest_stream

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ActivationStore",
    "HFDataset",
    "HarvestConfig",
    "HarvestStream",
    "NormalizationStats",
    "TokenWindow",
    "estimate_stats",
    "forward_to_hook",
    "harvest",
    "harvest_stream",
    "iter_documents",
    "iter_windows",
    "load_model",
    "outlier_keep_mask",
    "read_manifest",
    "validate_pair",
]
