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
