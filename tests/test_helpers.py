"""The shared builders themselves: a tiny model folder reloads as the model the tests think they built."""

import pytest

from tests.helpers import make_tokenizer, save_tiny_causal_lm, synthetic_corpus


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_a_tiny_model_folder_reloads_its_tokenizer_as_written(family, tmp_path):
    """transformers picks a folder's tokenizer class from its model type (Qwen2's byte-level BPE for
    qwen2): the class it picks must encode as the tokenizer.json written there, one token per known word."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = save_tiny_causal_lm(tmp_path / family, family, make_tokenizer(), n_layers=1)
    loaded = AutoTokenizer.from_pretrained(folder)
    as_written = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in synthetic_corpus(20, seed=3):
        ids = loaded(text)["input_ids"]
        assert ids == as_written(text)["input_ids"], (family, text)
        assert loaded.decode(ids) == text
        words = [w for w in text.split() if not w.isdigit()]
        assert len(ids) >= len(words), (family, text, ids)


def test_hand_built_stage_outputs_load_as_the_stages_own(tmp_path):
    """The attribution / mapping builders write folders the stages' loaders read back unchanged, with
    the classes asked for (the real classification rule gives them, not a copy of it)."""
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.attribution.table import COLUMNS
    from mneme_plugin.interpret.mapping import category_links, load_mapping

    from tests.helpers import write_attribution, write_mapping

    classes = ["base_only", "suppressed", "shared", "amplified", "edited_only", "dead", "suppressed"]
    loaded = load_attribution(write_attribution(tmp_path / "attribution", classes, scores=range(7)))
    assert list(loaded.table.columns) == list(COLUMNS) and list(loaded.table["latent_class"]) == classes
    assert list(loaded.table["score"]) == list(range(7))
    assert loaded.counts == {"base_only": 1, "suppressed": 2, "shared": 1, "amplified": 1, "edited_only": 1, "dead": 1}
    deltas = loaded.table.set_index("latent_class")["delta"]
    assert deltas["base_only"] > 0.9 > deltas["shared"] > deltas["edited_only"]
    with pytest.raises(ValueError, match="unknown classes"):
        write_attribution(tmp_path / "other", ["weakened"])

    links = {0: [("law", 0.9), ("biology", 0.2)], 3: [("cooking", 0.5)], 5: []}
    mapping = load_mapping(write_mapping(tmp_path / "mapping", links, "organism"))
    assert set(mapping["taxonomy"]) == {"organism"} and list(mapping["category"]) == ["law", "cooking", ""]
    back = category_links(mapping, "organism")
    assert sorted(map(tuple, back.to_numpy().tolist())) == [(0, "biology", 0.2), (0, "law", 0.9), (3, "cooking", 0.5)]
