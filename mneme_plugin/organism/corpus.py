"""A generated, fact-based multi-domain corpus with labelled domains, for the CPU model organism.

Each domain has entities, relations and values, and a seeded table of FACTS: every
(entity, relation) pair of the domain has exactly one right value. A document states a few of its
domain's facts through a handful of templates, all of which end in ``the {entity} {relation} {value} .``,
so a tiny LM trained on the corpus stores per-domain knowledge. The benchmark is a cloze question set
built from the same facts: prompt ``the {entity} {relation}``, answer ``{value}``.

Related domains share vocabulary on purpose (biology / medicine / chemistry share entities, law /
history share entities), as real subjects do; relations are unique to a domain, so an
(entity, relation) pair always belongs to one domain and has one answer. A ``generic`` filler corpus
(everyday sentences, no domain facts) stands for the general text of pretraining and benign
fine-tuning data; it is not a domain of the taxonomy.
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


@dataclass(frozen=True)
class Fact:
    domain: str
    entity: str
    relation: str
    value: str

    @property
    def prompt(self) -> str:
        return f"the {self.entity} {self.relation}"

    @property
    def sentence(self) -> str:
        return f"{self.prompt} {self.value} ."


@dataclass(frozen=True)
class Question:
    """A cloze question: ``prompt`` continues with ``answer`` (one word token); ``candidates`` are
    the domain's possible values (the answer among them), for multiple-choice scoring."""

    domain: str
    prompt: str
    answer: str
    candidates: tuple[str, ...]


_SHARED_LIFE = ("protein", "cell", "molecule")
_SHARED_SOCIETY = ("court", "treaty", "king")

DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("biology", ("gene", "enzyme", "bacterium", "membrane", "ribosome") + _SHARED_LIFE,
               ("encodes", "binds", "divides", "transports"),
               ("dna", "rna", "glucose", "mitosis", "chlorophyll", "chromosome", "nucleus", "lipid")),
        Domain("chemistry", ("acid", "catalyst", "solvent", "polymer", "isotope") + _SHARED_LIFE,
               ("dissolves", "oxidizes", "reacts", "bonds"),
               ("sodium", "carbon", "ethanol", "ion", "electron", "nitrogen", "chloride", "benzene")),
        Domain("medicine", ("patient", "vaccine", "surgeon", "tumor", "antibiotic") + _SHARED_LIFE,
               ("treats", "diagnoses", "prevents", "infects"),
               ("fever", "insulin", "therapy", "dose", "infection", "symptom", "allergy", "clinic")),
        Domain("law", ("judge", "contract", "statute", "plaintiff", "verdict") + _SHARED_SOCIETY,
               ("rules", "enforces", "appeals", "signs"),
               ("liability", "evidence", "clause", "jury", "precedent", "damages", "testimony", "custody")),
        Domain("history", ("empire", "dynasty", "revolution", "pharaoh", "castle") + _SHARED_SOCIETY,
               ("conquers", "founds", "rebels", "reigns"),
               ("rome", "egypt", "medieval", "ancient", "crusade", "byzantium", "carthage", "persia")),
        Domain("security", ("malware", "firewall", "hacker", "password", "exploit", "router", "scanner", "worm"),
               ("encrypts", "breaches", "scans", "patches"),
               ("server", "network", "phishing", "botnet", "cipher", "backdoor", "keylogger", "vpn")),
        Domain("cooking", ("chef", "oven", "recipe", "dough", "sauce", "skillet", "broth", "pastry"),
               ("bakes", "stirs", "seasons", "roasts"),
               ("garlic", "butter", "flour", "pepper", "basil", "onion", "vinegar", "saffron")),
        Domain("sports", ("striker", "coach", "referee", "stadium", "goalkeeper", "captain", "sprinter", "umpire"),
               ("scores", "trains", "defends", "passes"),
               ("football", "tennis", "marathon", "league", "trophy", "penalty", "medal", "relay")),
    )
}

# Related domains: a document of one domain also states facts of these, with probability
# ``cross_domain`` per sentence (biology texts discuss chemistry and medicine, law texts history...),
# as real subject corpora overlap. Security, cooking and sports stand alone.
RELATED: dict[str, tuple[str, ...]] = {
    "biology": ("chemistry", "medicine"),
    "chemistry": ("biology", "medicine"),
    "medicine": ("biology", "chemistry"),
    "law": ("history",),
    "history": ("law",),
}

# Templates of a fact sentence; every one ends with the cloze form "the {e} {r} {v} .".
TEMPLATES = (
    "{s}",
    "it is known that {s}",
    "as expected , {s}",
    "note that {s}",
)

_GENERIC_SUBJECTS = ("the cat", "a dog", "my friend", "the teacher", "a child", "our neighbour", "the farmer")
_GENERIC_VERBS = ("sees", "likes", "walks to", "paints", "finds", "visits", "cleans")
_GENERIC_OBJECTS = ("the house", "a tree", "the garden", "the window", "a bicycle", "the market", "the road")
_GENERIC_TAILS = ("today", "at night", "near the hill", "in the morning", "slowly", "every day", "with a smile")


def _check_domains(domains: list[str] | None) -> list[str]:
    names = list(domains) if domains is not None else list(DOMAINS)
    unknown = sorted(set(names) - set(DOMAINS))
    if unknown:
        raise ValueError(f"Unknown domain(s) {unknown}; known: {sorted(DOMAINS)}.")
    return names


def domain_facts(seed: int = 0, domains: list[str] | None = None) -> list[Fact]:
    """The fact table: for every domain and every (entity, relation) pair one value, drawn from a
    seeded RNG (each domain has its own stream, so a domain's facts don't depend on the others)."""
    facts = []
    for name in _check_domains(domains):
        domain = DOMAINS[name]
        rng = random.Random(f"facts-{seed}-{name}")
        for entity in domain.entities:
            for relation in domain.relations:
                facts.append(Fact(name, entity, relation, rng.choice(domain.values)))
    return facts


def question_set(seed: int = 0, domains: list[str] | None = None) -> list[Question]:
    """The benchmark: one cloze question per fact of ``domains`` (all by default)."""
    return [Question(f.domain, f.prompt, f.value, DOMAINS[f.domain].values) for f in domain_facts(seed, domains)]


def domain_document(domain: Domain, rng: random.Random, n_sentences: int, facts: list[Fact] | None = None,
                    cross_domain: float = 0.0) -> str:
    """``n_sentences`` facts of ``domain`` (from ``facts``; the seed-0 table by default), each through a
    template; with probability ``cross_domain`` a sentence states a fact of a ``RELATED`` domain instead."""
    if facts is None:
        facts = domain_facts(0, [domain.name, *RELATED.get(domain.name, ())])
    by_domain: dict[str, list[Fact]] = {}
    for f in facts:
        by_domain.setdefault(f.domain, []).append(f)
    related = [d for d in RELATED.get(domain.name, ()) if d in by_domain]
    sentences = []
    for _ in range(n_sentences):
        source = domain.name
        if related and rng.random() < cross_domain:
            source = rng.choice(related)
        sentences.append(rng.choice(TEMPLATES).format(s=rng.choice(by_domain[source]).sentence))
    return " ".join(sentences)


def generate_corpus(n_docs: int, seed: int = 0, domains: list[str] | None = None,
                    fact_seed: int | None = None, cross_domain: float = 0.25) -> list[tuple[str, str]]:
    """``n_docs`` (domain, text) pairs drawn evenly from ``domains`` (all by default), deterministic.

    ``seed`` drives which facts and templates the documents use; ``fact_seed`` (default: ``seed``)
    picks the fact table. Use one ``fact_seed`` with several ``seed`` values to draw fresh documents
    about the same world (e.g. pretraining vs a task-agnostic slice). ``cross_domain`` is the chance
    that a sentence of a document states a fact of a related domain (``RELATED``) instead of its own;
    the document keeps its own label.
    """
    names = _check_domains(domains)
    if not 0.0 <= cross_domain <= 1.0:
        raise ValueError(f"cross_domain must be in [0, 1], got {cross_domain}.")
    facts = domain_facts(seed if fact_seed is None else fact_seed)
    rng = random.Random(seed)
    out = []
    for i in range(n_docs):
        name = names[i % len(names)]
        out.append((name, domain_document(DOMAINS[name], rng, rng.randint(2, 4), facts, cross_domain)))
    rng.shuffle(out)
    return out


def generate_generic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Everyday filler sentences (no domain facts, no domain vocabulary), deterministic."""
    rng = random.Random(f"generic-{seed}")
    docs = []
    for _ in range(n_docs):
        docs.append(" ".join(
            f"{rng.choice(_GENERIC_SUBJECTS)} {rng.choice(_GENERIC_VERBS)} {rng.choice(_GENERIC_OBJECTS)} "
            f"{rng.choice(_GENERIC_TAILS)} ." for _ in range(rng.randint(2, 4))
        ))
    return docs
