import pytest
import torch

from mneme_plugin.organism import DOMAINS, generate_corpus, run_demo, tiny_hooked_transformer, train_lm, train_tokenizer


def test_corpus_is_deterministic_balanced_and_shares_vocabulary_between_related_domains():
    docs = generate_corpus(800, seed=3)
    assert docs == generate_corpus(800, seed=3) and docs != generate_corpus(800, seed=4)
    counts = {name: sum(d == name for d, _ in docs) for name in DOMAINS}
    assert set(counts.values()) == {100}
    words = {name: {w for d, t in docs if d == name for w in t.split()} for name in DOMAINS}
    assert "protein" in words["biology"] & words["medicine"] & words["chemistry"]
    assert "court" in words["law"] & words["history"]
    assert not (words["cooking"] - {"the", "."}) & (words["security"] - {"the", "."})
    with pytest.raises(ValueError, match="Unknown domain"):
        generate_corpus(10, domains=["astrology"])


def test_training_the_tiny_lm_lowers_its_loss():
    texts = [t for _, t in generate_corpus(400, seed=0)]
    tok = train_tokenizer(texts)
    model = tiny_hooked_transformer(tok, n_layers=1, d_model=32, seed=0)
    batch = torch.tensor([[tok.bos_token_id] + tok(texts[0] + " " + texts[1], add_special_tokens=False)["input_ids"]])
    before = model(batch, return_type="loss").item()
    train_lm(model, texts, steps=60, lr=3e-3, batch_size=8)
    assert model(batch, return_type="loss").item() < before - 0.5


@pytest.mark.slow
def test_demo_trains_a_good_crosscoder_between_base_and_fine_tuned(tmp_path):
    result = run_demo(tmp_path, progress=False)
    metrics = result.training.metrics
    assert result.store.num_rows > 10_000
    assert metrics.explained_variance_base > 0.9 and metrics.explained_variance_edited > 0.9
    assert metrics.dead_fraction < 0.15
