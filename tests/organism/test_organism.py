import json
import re

import pytest
import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.organism import (
    DOMAINS,
    RELATED,
    build_organism,
    domain_facts,
    generate_corpus,
    generate_generic_corpus,
    question_set,
    run_demo,
    tiny_hooked_transformer,
    train_lm,
    train_tokenizer,
)
from mneme_plugin.organism.corpus import TEMPLATES

TEMPLATE_WORDS = {w for t in TEMPLATES for w in t.replace("{s}", "").split()} | {"the", "."}


def test_corpus_is_deterministic_balanced_and_shares_vocabulary_between_related_domains():
    docs = generate_corpus(800, seed=3)
    assert docs == generate_corpus(800, seed=3) and docs != generate_corpus(800, seed=4)
    counts = {name: sum(d == name for d, _ in docs) for name in DOMAINS}
    assert set(counts.values()) == {100}
    words = {name: {w for d, t in docs if d == name for w in t.split()} for name in DOMAINS}
    assert "protein" in words["biology"] & words["medicine"] & words["chemistry"]
    assert "court" in words["law"] & words["history"]
    assert not (words["cooking"] - TEMPLATE_WORDS) & (words["security"] - TEMPLATE_WORDS)
    generic = {w for t in generate_generic_corpus(200) for w in t.split()}
    assert not generic & {w for name in DOMAINS for w in words[name]} - {"the", ".", "a"}
    with pytest.raises(ValueError, match="Unknown domain"):
        generate_corpus(10, domains=["astrology"])


def test_facts_are_functional_and_every_question_is_stated_in_the_corpus():
    facts = domain_facts(5)
    assert facts == domain_facts(5) and facts != domain_facts(6)
    keys = [(f.entity, f.relation) for f in facts]
    assert len(keys) == len(set(keys)), "an (entity, relation) pair must have one value across all domains"
    questions = question_set(5)
    assert {q.domain for q in questions} == set(DOMAINS)
    assert all(q.answer in q.candidates and q.answer in DOMAINS[q.domain].values for q in questions)
    docs = generate_corpus(4000, seed=11, fact_seed=5)
    text = " ".join(t for _, t in docs)
    for q in questions:
        assert f"{q.prompt} {q.answer} ." in text
        # ... and never with another value.
        others = set(re.findall(rf"{q.prompt} (\w+) \.", text)) - {q.answer}
        assert not others, (q, others)


def test_cross_domain_sentences_come_only_from_related_domains():
    facts = {f.sentence: f.domain for f in domain_facts(0)}
    for domain, text in generate_corpus(400, seed=0, cross_domain=0.5):
        sources = {facts[m] for m in re.findall(r"the \w+ \w+ \w+ \.", text)}
        assert sources <= {domain, *RELATED.get(domain, ())}
    pure = generate_corpus(200, seed=0, cross_domain=0.0)
    assert all({facts[m] for m in re.findall(r"the \w+ \w+ \w+ \.", t)} == {d} for d, t in pure)


def test_training_the_tiny_lm_lowers_its_loss():
    texts = [t for _, t in generate_corpus(400, seed=0)]
    tok = train_tokenizer(texts)
    model = tiny_hooked_transformer(tok, n_layers=1, d_model=32, seed=0)
    batch = torch.tensor([[tok.bos_token_id] + tok(texts[0] + " " + texts[1], add_special_tokens=False)["input_ids"]])
    before = model(batch, return_type="loss").item()
    train_lm(model, texts, steps=60, lr=3e-3, batch_size=8)
    assert model(batch, return_type="loss").item() < before - 0.5


def test_build_organism_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="Unknown intervention"):
        build_organism(intervention="lobotomy")
    with pytest.raises(ConfigError, match="target_domain"):
        build_organism(intervention="rmu", target_domain="astrology")


def test_the_task_agnostic_slice_scales_without_touching_the_models():
    from collections import Counter

    from mneme_plugin.organism.build import Organism, OrganismConfig, agnostic_slice, behaviour_organism_config, with_agnostic_docs

    cfg = OrganismConfig()
    default = agnostic_slice(3, cfg, excluded=[])
    assert len(default) == cfg.agnostic_docs and default == agnostic_slice(3, cfg, excluded=[])
    assert Counter(label for label, _ in default)["generic"] == cfg.agnostic_docs // 5
    excluded = [text for label, text in default if label == "law"][:7]
    assert not {t for _, t in agnostic_slice(3, cfg, excluded)} & set(excluded)
    big = agnostic_slice(3, cfg, excluded=[], n_docs=4 * cfg.agnostic_docs)
    labels = Counter(label for label, _ in big)
    assert len(big) == 4 * cfg.agnostic_docs and labels["generic"] == 4 * cfg.agnostic_docs // 5
    assert set(labels) == set(DOMAINS) | {"generic"} and max(labels[d] for d in DOMAINS) - min(labels[d] for d in DOMAINS) <= 1
    chat = Counter(label for label, _ in agnostic_slice(3, behaviour_organism_config(), [], n_docs=2 * cfg.agnostic_docs))
    assert chat["conversation"] == 2 * behaviour_organism_config().conversation_docs // 5
    with pytest.raises(ConfigError, match="at least 5 documents"):
        agnostic_slice(3, cfg, [], n_docs=2)
    # An organism with another slice keeps its models, ground truth and edit, and leaves out the edit texts.
    base, edited = object(), object()
    organism = Organism(tokenizer=None, base=base, edited=edited, questions=[], accuracy_before={"law": 1.0},
                        accuracy_after={"law": 0.5}, drop={"law": 0.5}, intervention="rmu", intervention_config={},
                        target_domain="law", agnostic_corpus=["x"], agnostic_labels=["generic"], edit_texts=excluded,
                        config=cfg)
    wider = with_agnostic_docs(organism, 3, 3 * cfg.agnostic_docs)
    assert wider.base is base and wider.edited is edited and wider.drop == organism.drop
    assert organism.agnostic_corpus == ["x"]  # the original is left as it was
    assert len(wider.agnostic_corpus) == len(wider.agnostic_labels) > 2 * cfg.agnostic_docs
    assert not set(wider.agnostic_corpus) & set(excluded)


@pytest.mark.slow
def test_build_organism_rmu_unlearns_the_target_and_caches(tmp_path):
    org = build_organism(0, "rmu", "biology", out_dir=tmp_path, progress=False)
    assert min(org.accuracy_before.values()) >= 0.8
    assert org.drop["biology"] >= 0.5
    assert not set(org.agnostic_corpus) & set(org.edit_texts)
    assert set(org.agnostic_labels) == set(DOMAINS) | {"generic"}
    assert (tmp_path / "groundtruth-rmu-biology.csv").exists()
    again = build_organism(0, "rmu", "biology", out_dir=tmp_path, progress=False)
    assert again.timings["base"] + again.timings["edit"] < 10
    assert again.accuracy_after == org.accuracy_after
    # The organism:PATH model spec of run configs reloads the same model (tokenizer rebuilt from the seed).
    from mneme_plugin.groundtruth import domain_accuracy
    from mneme_plugin.organism import load_organism_model

    reloaded = load_organism_model(org.model_paths["edited"])
    assert domain_accuracy(reloaded, org.questions) == org.accuracy_after


@pytest.mark.slow
def test_demo_predicts_the_rmu_side_effects_better_than_the_baselines(tmp_path):
    """Issue 7's check: on the RMU case MNEME's Eq. 4 accuracy is >= 0.8 and above random and naive.

    The other interventions' figures are printed (they are reported, not asserted).
    """
    result = run_demo(tmp_path, progress=False)
    by_case = {case.intervention: case for case in result.cases}
    print(result.table().to_string())
    rmu = by_case["rmu"]
    assert rmu.degraded, "the RMU organism must have degraded domains to predict"
    metrics = rmu.metrics.set_index("method")
    assert metrics.loc["MNEME", "accuracy"] >= 0.8
    assert metrics.loc["MNEME", "accuracy"] > metrics.loc["random", "accuracy"]
    assert metrics.loc["MNEME", "accuracy"] > metrics.loc["naive", "accuracy"]
    quality = json.loads((rmu.run_dir / "crosscoder_run" / "metrics.json").read_text())
    assert quality["explained_variance_base"] > 0.9 and quality["explained_variance_edited"] > 0.9
    for case in result.cases:
        assert (case.run_dir / "report.html").is_file()
    from click.testing import CliRunner

    from mneme_plugin.cli import main

    info = CliRunner().invoke(main, ["info", str(rmu.run_dir.parent)]).output
    assert info.startswith(f"Demo case {rmu.run_dir.parent} (`mneme demo`): RMU unlearning of law knowledge"), info
    assert "  remediation:   share of the lost accuracy recovered: remediation " in info
    # Remediation vs the random-window control ran on the degraded domains (figures reported, not asserted).
    from mneme_plugin.sideeffects import load_controlled_remediation

    remediation = load_controlled_remediation(rmu.run_dir.parent)
    assert remediation.degraded == rmu.degraded and remediation.edited == rmu.remediation.edited
    assert len(remediation.control_rows) == remediation.n_samples > 0
    print(result.remediation_table().to_string())
