"""The CPU model organism: a generated multi-domain corpus, tiny LMs trained on it, and the demo."""

from mneme_plugin.organism.corpus import DOMAINS, Domain, generate_corpus
from mneme_plugin.organism.demo import DemoResult, run_demo
from mneme_plugin.organism.models import finetuned_copy, tiny_hooked_transformer, train_lm, train_tokenizer

__all__ = [
    "DOMAINS",
    "DemoResult",
    "Domain",
    "finetuned_copy",
    "generate_corpus",
    "run_demo",
    "tiny_hooked_transformer",
    "train_lm",
    "train_tokenizer",
]
