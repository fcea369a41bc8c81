"""Interpreting latents: top contexts (Delphi cache layout), explanations, categories.

Delphi and vLLM are optional: the offline explainer and the lexical mapper need neither; with
Delphi installed its real explainers / scorers / ``LatentDataset`` do the work (see
``delphi_compat`` for how Delphi's import-time vLLM dependency is handled).
"""

from mneme_plugin.interpret.clients import (
    Client,
    ClientError,
    DiskCache,
    OpenAICompatibleClient,
    Response,
    VLLMOfflineClient,
    as_delphi_client,
    make_client,
)
from mneme_plugin.interpret.config import ClientConfig, CollectConfig, ExplainConfig, MapConfig
from mneme_plugin.interpret.contexts import (
    LatentContexts,
    TopContextCollector,
    collect,
    iter_records_delphi,
    load_contexts,
    select_latents,
    write_delphi_cache,
)
from mneme_plugin.interpret.delphi_compat import DelphiUnavailableError, delphi_installed, import_delphi
from mneme_plugin.interpret.explain import OfflineExplainer, explain, load_explanations
from mneme_plugin.interpret.mapping import LexicalMapper, map_descriptions, offline_label
from mneme_plugin.interpret.taxonomy import Taxonomy, TaxonomyEntry, builtin_taxonomies, load_taxonomy

__all__ = [
    "Client", "ClientConfig", "ClientError", "CollectConfig", "DelphiUnavailableError", "DiskCache",
    "ExplainConfig", "LatentContexts", "LexicalMapper", "MapConfig", "OfflineExplainer",
    "OpenAICompatibleClient", "Response", "Taxonomy", "TaxonomyEntry", "TopContextCollector",
    "VLLMOfflineClient", "as_delphi_client", "builtin_taxonomies", "collect", "delphi_installed", "explain",
    "import_delphi", "iter_records_delphi", "load_contexts", "load_explanations", "load_taxonomy",
    "make_client", "map_descriptions", "offline_label", "select_latents", "write_delphi_cache",
]
