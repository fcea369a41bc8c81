"""Offline explainer + lexical mapper on planted latents: latent i fires on domain i's words."""

from __future__ import annotations

import json
import logging
import random

import pandas as pd
import pytest
import torch

from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.interpret import (
    CollectConfig, ExplainConfig, MapConfig, OfflineExplainer, TopContextCollector, explain, load_contexts, load_taxonomy,
    map_descriptions,
)
from mneme_plugin.organism.corpus import DOMAINS
from tests.helpers import make_tokenizer

NAMES = list(DOMAINS)
GENERIC = "the cat a dog sees likes house tree road today slowly friend".split()


def domain_words(name):
    d = DOMAINS[name]
    return list(d.entities + d.relations + d.values)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    vocab_texts = [" ".join(domain_words(n)) for n in NAMES] + [" ".join(GENERIC)]
    tok = make_tokenizer(vocab_texts * 3)
    rng = random.Random(0)
    all_words = [w for n in NAMES for w in domain_words(n)] + GENERIC * 4
    ctx, n_ctx = 16, 400
    col = TopContextCollector(list(range(len(NAMES))), ctx, n_top=20, n_random=5, n_non_activating=5,
                              seed=0, vocab_size=len(tok))
    owner = {}
    for i, n in enumerate(NAMES):
        d = DOMAINS[n]
        for w in d.relations + d.values:  # words unique to a domain
            owner[tok.convert_tokens_to_ids(w)] = i
    for _ in range(n_ctx // 50):
        toks = torch.tensor([[tok.convert_tokens_to_ids(rng.choice(all_words)) for _ in range(ctx)] for _ in range(50)])
        acts = torch.zeros(50, ctx, len(NAMES))
        for c in range(50):
            for p in range(ctx):
                i = owner.get(int(toks[c, p]))
                if i is not None:
                    acts[c, p, i] = 1.0 + rng.random()
        col.update(toks, acts, torch.ones(50, ctx, dtype=torch.bool))
    out = tmp_path_factory.mktemp("planted")
    contexts = col.result()
    contexts.save(out, "blocks.0.hook_resid_post", width=len(NAMES), tokenizer=tok)
    return out, tok, contexts


def test_offline_explainer_names_the_planted_words(planted):
    out, tok, contexts = planted
    ex = OfflineExplainer(tok, n_examples=20, n_terms=5)
    for i, name in enumerate(NAMES):
        e = ex.explain(contexts, i)
        unique = set(DOMAINS[name].relations + DOMAINS[name].values)
        assert e.terms and set(e.terms) <= unique, (name, e.terms)


def test_explain_and_map_pick_the_planted_domain(planted, tmp_path):
    out, tok, contexts = planted
    table = explain(out, ExplainConfig(explainer="offline"), out_dir=tmp_path)
    assert list(table["latent"]) == list(range(len(NAMES)))
    assert (tmp_path / "explanations.parquet").is_file() and (tmp_path / "explanations.csv").is_file()
    cats = map_descriptions(tmp_path, MapConfig(taxonomies=["organism", "mmlu"], top_k=3), out_dir=tmp_path)
    org = cats[cats["taxonomy"] == "organism"].set_index("latent")
    for i, name in enumerate(NAMES):
        assert org.loc[i, "category"] == name, (name, org.loc[i, "description"], org.loc[i, "top_k"])
        assert org.loc[i, "label"] != "unlabelled"
        assert len(json.loads(org.loc[i, "top_k"])) == 3
    back = pd.read_parquet(tmp_path / "categories.parquet")
    assert len(back) == 2 * len(NAMES) and set(back["taxonomy"]) == {"organism", "mmlu"}
    assert (tmp_path / "categories.csv").is_file()
    mmlu = cats[cats["taxonomy"] == "mmlu"].set_index("latent")
    assert mmlu.loc[NAMES.index("security"), "category"] == "computer_security"
    # The configs as mappings (YAML sections), as train and attribute take them; a latent never collected is named.
    again = explain(out, {"explainer": "offline"}, out_dir=tmp_path / "again")
    pd.testing.assert_frame_equal(again, table)
    pd.testing.assert_frame_equal(map_descriptions(tmp_path / "again", {"taxonomies": ["organism", "mmlu"], "top_k": 3},
                                                   out_dir=tmp_path / "again"), cats)
    with pytest.raises(ConfigError, match=r"Latent\(s\) \[99999\] were not collected"):
        explain(out, ExplainConfig(explainer="offline"), out_dir=tmp_path / "bad", latents=[0, 99999])


def test_contexts_collected_again_into_a_folder_remove_its_earlier_explanations_and_mapping(planted, tmp_path):
    """`mneme explain` writes beside the contexts by default: contexts collected again into that folder (other
    latents) left the earlier explanations and mapping there, read by `mneme info`, `map` and `predict` as theirs."""
    out, tok, contexts = planted
    folder = tmp_path / "contexts"
    contexts.save(folder, "blocks.0.hook_resid_post", width=len(NAMES), tokenizer=tok)
    explain(folder, ExplainConfig(explainer="offline"), out_dir=folder)
    map_descriptions(folder, MapConfig(taxonomies=["organism"]), out_dir=folder)
    assert {"explanations.parquet", "explanations.csv", "categories.parquet", "categories.csv"} <= {
        p.name for p in folder.iterdir()}
    contexts.save(folder, "blocks.0.hook_resid_post", width=len(NAMES), tokenizer=tok)
    assert not {"explanations.parquet", "explanations.csv", "categories.parquet", "categories.csv"} & {
        p.name for p in folder.iterdir()}
    assert load_contexts(folder).latents == contexts.latents  # the contexts themselves are whole


def test_explanations_written_again_into_a_folder_remove_the_mapping_of_the_earlier_ones(planted, tmp_path):
    """`mneme map` writes beside the explanations by default: explaining again into that folder (other settings)
    left the earlier explanations' mapping there, its descriptions not these explanations, read as theirs."""
    from mneme_plugin.interpret.mapping import load_mapping

    out, tok, contexts = planted
    folder = tmp_path / "contexts"
    contexts.save(folder, "blocks.0.hook_resid_post", width=len(NAMES), tokenizer=tok)
    first = explain(folder, ExplainConfig(explainer="offline", n_terms=5), out_dir=folder)
    map_descriptions(folder, MapConfig(taxonomies=["organism"]), out_dir=folder)
    assert set(load_mapping(folder)["description"]) == set(first["explanation"])
    second = explain(folder, ExplainConfig(explainer="offline", n_terms=1), out_dir=folder)
    assert set(second["explanation"]) != set(first["explanation"])
    assert not {"categories.parquet", "categories.csv"} & {p.name for p in folder.iterdir()}
    with pytest.raises(CheckpointError, match="run the map stage"):
        load_mapping(folder)
    map_descriptions(folder, MapConfig(taxonomies=["organism"]), out_dir=folder)
    assert set(load_mapping(folder)["description"]) == set(second["explanation"])


def test_collecting_by_class_without_the_attribution_is_refused():
    """`CollectConfig(classes=["suppressed"])` without an attribution collected every latent, silently."""
    from mneme_plugin.interpret.contexts import select_latents

    assert select_latents(None, CollectConfig(), width=4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"collect\.classes \['suppressed'\] choose latents by their attribution"):
        select_latents(None, CollectConfig(classes=["suppressed"]), width=4)


@pytest.fixture(scope="module")
def neutral_firing(tmp_path_factory):
    """Latent i fires only on the neutral word "slowly", and only in contexts that also hold words
    of domain i elsewhere: its activating token names no domain, its contexts do."""
    vocab_texts = [" ".join(domain_words(n)) for n in NAMES] + [" ".join(GENERIC)]
    tok = make_tokenizer(vocab_texts * 3)
    rng = random.Random(1)
    ctx, n_rows = 16, 50
    neutral = tok.convert_tokens_to_ids("slowly")
    col = TopContextCollector(list(range(len(NAMES))), ctx, n_top=20, n_random=5, n_non_activating=5,
                              seed=0, vocab_size=len(tok))
    filler = [w for w in GENERIC if w != "slowly"]
    for batch in range(16):
        toks = torch.tensor([[tok.convert_tokens_to_ids(rng.choice(filler)) for _ in range(ctx)] for _ in range(n_rows)])
        acts = torch.zeros(n_rows, ctx, len(NAMES))
        for c in range(n_rows):
            i = rng.randrange(len(NAMES))
            positions = rng.sample(range(ctx), 4)
            for p in positions[:3]:  # three words of domain i somewhere in the context
                toks[c, p] = tok.convert_tokens_to_ids(rng.choice(DOMAINS[NAMES[i]].relations + DOMAINS[NAMES[i]].values))
            toks[c, positions[3]] = neutral
            if batch % 2 == 0:  # half of the contexts with "slowly" activate their domain's latent
                acts[c, positions[3], i] = 1.0 + rng.random()
        col.update(toks, acts, torch.ones(n_rows, ctx, dtype=torch.bool))
    out = tmp_path_factory.mktemp("neutral")
    col.result().save(out, "blocks.0.hook_resid_post", width=len(NAMES), tokenizer=tok)
    return out


def test_context_terms_name_the_subject_of_a_neutral_latent(neutral_firing, tmp_path):
    plain = explain(neutral_firing, ExplainConfig(explainer="offline"), out_dir=tmp_path / "plain")
    assert all(json.loads(t)[0] == "slowly" for t in plain["terms"])
    mapped = map_descriptions(plain, MapConfig(taxonomies=["organism"]), out_dir=tmp_path / "plain")
    assert mapped["category"].isna().all()  # "slowly" names no domain
    table = explain(neutral_firing, ExplainConfig(explainer="offline", n_context_terms=5), out_dir=tmp_path / "ctx")
    cats = map_descriptions(table, MapConfig(taxonomies=["organism"]), out_dir=tmp_path / "ctx").set_index("latent")
    for i, name in enumerate(NAMES):
        assert cats.loc[i, "category"] == name, (name, cats.loc[i, "description"])
        assert "in contexts with" in cats.loc[i, "description"]
    with pytest.raises(ConfigError, match="n_context_terms"):
        ExplainConfig(n_context_terms=-1)


def test_taxonomies_and_user_file(tmp_path):
    assert len(load_taxonomy("mmlu").entries) == 57
    assert load_taxonomy("mmlu_pro").ids() == ["biology", "business", "chemistry", "computer_science", "economics",
                                               "engineering", "health", "history", "law", "math", "other",
                                               "philosophy", "physics", "psychology"]
    assert "power_seeking" in load_taxonomy("emergent_misalignment").ids()
    assert load_taxonomy("organism").ids() == NAMES
    user = tmp_path / "mine.yaml"
    user.write_text("name: mine\nentries:\n  - id: pets\n    keywords: [cat, dog]\n  - id: roads\n    keywords: road\n")
    tax = load_taxonomy(user)
    assert tax.ids() == ["pets", "roads"]
    cats = map_descriptions(pd.DataFrame({"latent": [1], "explanation": ['Tokens "dog", "cat"']}),
                            MapConfig(taxonomies=[str(user)], top_k=1))
    assert cats.loc[0, "category"] == "pets"
    # a user file named like a built-in: its rows and the built-in's would share the taxonomy name
    clash = tmp_path / "organism.yaml"
    clash.write_text("name: organism\nentries:\n  - id: zzz\n    keywords: [dog]\n")
    with pytest.raises(ConfigError, match=r"taxonomies of the same name \['organism'\]"):
        map_descriptions(pd.DataFrame({"latent": [1], "explanation": ['Tokens "dog"']}),
                         MapConfig(taxonomies=["organism", str(clash)], top_k=1))
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [{name: x}]\n")
    with pytest.raises(ConfigError, match="needs an 'id'"):
        load_taxonomy(bad)
    with pytest.raises(ConfigError, match="Unknown taxonomy"):
        load_taxonomy("nope")


def test_organism_taxonomy_matches_the_corpus_vocabulary():
    tax = load_taxonomy("organism")
    for name in NAMES:
        assert set(domain_words(name)) <= set(tax.by_id[name].keywords), f"regenerate organism.yaml for {name}"


def test_repeated_delphi_warnings_collapse_into_one_line(caplog):
    from mneme_plugin.interpret.explain import _OncePerMessage

    delphi_logger = logging.getLogger("delphi.test_collapse")
    with caplog.at_level(logging.WARNING), _OncePerMessage(delphi_logger):
        for _ in range(3):
            delphi_logger.warning("No available randomly sampled non-activating sequences")
        delphi_logger.warning("another message")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["No available randomly sampled non-activating sequences", "another message",
                        "(3 times in all) No available randomly sampled non-activating sequences"]
    delphi_logger.warning("after")  # the filter is gone once the block ends
    assert caplog.records[-1].getMessage() == "after"


def test_a_table_write_stopped_after_the_csv_leaves_no_earlier_parquet_to_be_read(tmp_path):
    """Readers prefer the parquet: a rewrite whose parquet fails (here a column pyarrow cannot convert, which the
    CSV writes) must not leave the earlier parquet beside the new CSV."""
    import pandas as pd

    from mneme_plugin.interpret.explain import load_explanations
    from mneme_plugin.interpret.files import EXPLANATIONS_STEM, write_table

    write_table(pd.DataFrame({"latent": [0, 1], "explanation": ["old a", "old b"]}), tmp_path, EXPLANATIONS_STEM)
    new = pd.DataFrame({"latent": [0, 1], "explanation": ["new a", "new b"], "mixed": [1, "x"]})
    with pytest.raises(Exception):
        write_table(new, tmp_path, EXPLANATIONS_STEM)
    assert load_explanations(tmp_path)["explanation"].tolist() == ["new a", "new b"]
