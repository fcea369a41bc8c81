"""The CPU model organism: a generated fact-based multi-domain corpus (plus, optionally, request /
response conversations with learnt behaviours), tiny LMs trained on it, interventions with a measured
ground truth (``build_organism``), and the demo."""

from mneme_plugin._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "mneme_plugin.organism.behaviour": (
        "BEHAVIOUR_CATEGORIES",
        "HARMS",
        "PERSONAS",
        "BehaviourItem",
        "behaviour_benchmark",
        "behaviour_scores",
        "generate_conversations",
        "greedy_responses",
    ),
    "mneme_plugin.organism.build": (
        "INTERVENTIONS",
        "Organism",
        "OrganismConfig",
        "behaviour_organism_config",
        "build_organism",
        "default_intervention_config",
        "load_organism_model",
        "save_organism_model",
    ),
    "mneme_plugin.organism.corpus": (
        "DOMAINS",
        "RELATED",
        "Domain",
        "Fact",
        "Question",
        "domain_facts",
        "generate_corpus",
        "generate_generic_corpus",
        "question_set",
    ),
    "mneme_plugin.organism.demo": ("DemoResult", "run_demo"),
    "mneme_plugin.organism.models": ("finetuned_copy", "tiny_hooked_transformer", "train_lm", "train_tokenizer"),
})
