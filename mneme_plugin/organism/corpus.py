"""A generated multi-domain corpus with labelled domains, for the CPU model organism.

Each domain has entities, relations and values; a document states a few facts of one domain,
so a tiny LM trained on it learns per-domain knowledge. Related domains share vocabulary on
purpose (biology / medicine / chemistry, law / history), as real subjects do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Domain:
    name: str
    entities: tuple[str, ...]
    relations: tuple[str, ...]
    values: tuple[str, ...]


_SHARED_LIFE = ("protein", "cell", "molecule")
_SHARED_SOCIETY = ("court", "treaty", "king")

DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("biology", ("gene", "enzyme", "bacterium", "membrane", "ribosome") + _SHARED_LIFE,
               ("encodes", "binds", "divides", "transports"), ("dna", "rna", "glucose", "mitosis", "chlorophyll")),
        Domain("chemistry", ("acid", "catalyst", "solvent", "polymer", "isotope") + _SHARED_LIFE,
               ("dissolves", "oxidizes", "reacts", "bonds"), ("sodium", "carbon", "ethanol", "ion", "electron")),
        Domain("medicine", ("patient", "vaccine", "surgeon", "tumor", "antibiotic") + _SHARED_LIFE,
               ("treats", "diagnoses", "prevents", "infects"), ("fever", "insulin", "therapy", "dose", "infection")),
        Domain("law", ("judge", "contract", "statute", "plaintiff", "verdict") + _SHARED_SOCIETY,
               ("rules", "enforces", "appeals", "signs"), ("liability", "evidence", "clause", "jury", "precedent")),
        Domain("history", ("empire", "dynasty", "revolution", "pharaoh", "castle") + _SHARED_SOCIETY,
               ("conquers", "founds", "rebels", "rules"), ("rome", "egypt", "medieval", "ancient", "crusade")),
        Domain("security", ("malware", "firewall", "hacker", "password", "exploit"),
               ("encrypts", "breaches", "scans", "patches"), ("server", "network", "phishing", "botnet", "cipher")),
        Domain("cooking", ("chef", "oven", "recipe", "dough", "sauce"),
               ("bakes", "stirs", "seasons", "roasts"), ("garlic", "butter", "flour", "pepper", "basil")),
        Domain("sports", ("striker", "coach", "referee", "stadium", "goalkeeper"),
               ("scores", "trains", "defends", "passes"), ("football", "tennis", "marathon", "league", "trophy")),
    )
}


def domain_document(domain: Domain, rng: random.Random, n_sentences: int) -> str:
    sentences = [
        f"the {rng.choice(domain.entities)} {rng.choice(domain.relations)} {rng.choice(domain.values)} ."
        for _ in range(n_sentences)
    ]
    return " ".join(sentences)


def generate_corpus(n_docs: int, seed: int = 0, domains: list[str] | None = None) -> list[tuple[str, str]]:
    """``n_docs`` (domain, text) pairs drawn evenly from ``domains`` (all by default), deterministic."""
    names = list(domains) if domains is not None else list(DOMAINS)
    unknown = sorted(set(names) - set(DOMAINS))
    if unknown:
        raise ValueError(f"Unknown domain(s) {unknown}; known: {sorted(DOMAINS)}.")
    rng = random.Random(seed)
    out = []
    for i in range(n_docs):
        name = names[i % len(names)]
        out.append((name, domain_document(DOMAINS[name], rng, rng.randint(2, 4))))
    rng.shuffle(out)
    return out
