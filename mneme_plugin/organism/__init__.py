"""The CPU model organism: a generated fact-based multi-domain corpus, tiny LMs trained on it,
interventions with a measured ground truth (``build_organism``), and the demo."""

from mneme_plugin.organism.build import (
    INTERVENTIONS,
    Organism,
    OrganismConfig,
    build_organism,
    default_intervention_config,
    load_organism_model,
)
from mneme_plugin.organism.corpus import (
    DOMAINS,
    RELATED,
    Domain,
    Fact,
    Question,
    domain_facts,
    generate_corpus,
    generate_generic_corpus,
    question_set,
)
from mneme_plugin.organism.demo import DemoResult, run_demo
from mneme_plugin.organism.models import finetuned_copy, tiny_hooked_transformer, train_lm, train_tokenizer

__all__ = [
    "DOMAINS",
    "DemoResult",
    "Domain",
    "Fact",
    "INTERVENTIONS",
    "Organism",
    "OrganismConfig",
    "Question",
    "RELATED",
    "build_organism",
    "default_intervention_config",
    "domain_facts",
    "finetuned_copy",
    "generate_corpus",
    "generate_generic_corpus",
    "load_organism_model",
    "question_set",
    "run_demo",
    "tiny_hooked_transformer",
    "train_lm",
    "train_tokenizer",
]
