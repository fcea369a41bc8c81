"""Interpreting latents: top contexts (Delphi cache layout), explanations, categories.

Delphi and vLLM are optional: the offline explainer and the lexical mapper need neither; with
Delphi installed its real explainers / scorers / ``LatentDataset`` do the work (see
``delphi_compat`` for how Delphi's import-time vLLM dependency is handled)."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.interpret.clients": (
        "Client",
        "ClientError",
        "DiskCache",
        "OpenAICompatibleClient",
        "Response",
        "VLLMOfflineClient",
        "as_delphi_client",
        "make_client",
    ),
    "mneme_plugin.interpret.config": ("ClientConfig", "CollectConfig", "ExplainConfig", "MapConfig"),
    "mneme_plugin.interpret.contexts": (
        "LatentContexts",
        "TopContextCollector",
        "collect",
        "iter_records_delphi",
        "load_contexts",
        "select_latents",
        "write_delphi_cache",
    ),
    "mneme_plugin.interpret.delphi_compat": ("DelphiUnavailableError", "delphi_installed", "import_delphi"),
    "mneme_plugin.interpret.explain": ("OfflineExplainer", "explain", "load_explanations"),
    "mneme_plugin.interpret.mapping": ("LexicalMapper", "map_descriptions", "offline_label"),
    "mneme_plugin.interpret.taxonomy": ("Taxonomy", "TaxonomyEntry", "builtin_taxonomies", "load_taxonomy"),
})
