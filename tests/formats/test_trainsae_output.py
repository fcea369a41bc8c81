"""A crosscoder trained by dictionary_learning's own `trainSAE` with our `BatchTopKCrossCoderTrainer` (the README
says it runs unchanged) loads back: `load_crosscoder` on its `trainer_0/` folder, and `mneme import`."""

from __future__ import annotations

import torch
from click.testing import CliRunner

from mneme_plugin import BatchTopKCrossCoderTrainer, load_crosscoder
from mneme_plugin.cli import main
from mneme_plugin.formats import detect_format


def _planted_batches(d: int = 16, n_features: int = 24, batch: int = 256, seed: int = 0):
    """(B, 2, d) rows made of a few of ``n_features`` planted (base, edited) directions each."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_features, 2, d, generator=gen), dim=-1)
    while True:
        codes = torch.rand(batch, n_features, generator=gen) * (torch.rand(batch, n_features, generator=gen) < 0.1)
        yield torch.einsum("bf,fmd->bmd", codes, directions)


def test_a_trainsae_output_of_our_trainer_loads_as_the_crosscoder_it_trained(tmp_path):
    from dictionary_learning.training import trainSAE

    models = {"base_model": "org/base", "edited_model": "org/edited", "hook_name": "blocks.3.hook_resid_post"}
    trainSAE(_planted_batches(), [dict(trainer=BatchTopKCrossCoderTrainer, steps=150, activation_dim=16, dict_size=64,
                                       k=4, batch_size=256, device="cpu", layer=3, lm_name="tiny", seed=0,
                                       metadata=models)],
             steps=150, save_dir=str(tmp_path / "dl"), device="cpu")
    folder = tmp_path / "dl" / "trainer_0"
    assert detect_format(folder) == "dictionary-learning" and detect_format(folder / "ae.pt") == "dictionary-learning"
    crosscoder = load_crosscoder(folder)
    saved = torch.load(folder / "ae.pt", weights_only=True)
    assert set(saved) == set(crosscoder.state_dict())
    assert all(torch.equal(crosscoder.state_dict()[name], tensor) for name, tensor in saved.items())
    assert (crosscoder.cfg.dict_size, crosscoder.cfg.k, crosscoder.cfg.metadata["layer"]) == (64, 4, 3)
    assert {key: crosscoder.cfg.metadata.get(key) for key in models} == models  # what names the export and report
    # It is the crosscoder the trainer trained, threshold included: the same trainer run step by step by hand on
    # the same batches ends with the same codes and reconstructions.
    trainer = BatchTopKCrossCoderTrainer(steps=150, activation_dim=16, dict_size=64, k=4, batch_size=256,
                                         device="cpu", layer=3, lm_name="tiny", seed=0)
    batches = _planted_batches()
    for step in range(150):
        trainer.update(step, next(batches))
    x = next(_planted_batches(seed=1))
    assert float(crosscoder.threshold) > 0 and torch.equal(crosscoder.threshold, trainer.ae.threshold)
    assert torch.equal(crosscoder.encode(x), trainer.ae.encode(x)) and torch.equal(crosscoder(x), trainer.ae(x))
    result = CliRunner().invoke(main, ["import", str(folder), "--out", str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    assert torch.equal(load_crosscoder(tmp_path / "ours").W_dec, crosscoder.W_dec)


def test_trainsae_with_normalize_activations_saves_a_crosscoder_of_raw_activations(tmp_path):
    """trainSAE(normalize_activations=True) trains on activations divided by a norm factor and calls the
    dictionary's scale_biases(norm factor) before saving (it raised AttributeError on our crosscoder): the
    saved crosscoder reads raw activations and reconstructs them."""
    from dictionary_learning.training import trainSAE

    raw = (40.0 * x for x in _planted_batches())
    trainSAE(raw, [dict(trainer=BatchTopKCrossCoderTrainer, steps=150, activation_dim=16, dict_size=64,
                        k=4, batch_size=256, device="cpu", layer=3, lm_name="tiny", seed=0)],
             steps=150, save_dir=str(tmp_path / "dl"), device="cpu", normalize_activations=True)
    crosscoder = load_crosscoder(tmp_path / "dl" / "trainer_0")
    batches = _planted_batches()  # the planted directions are the seed's: rows after those trained on
    for _ in range(400):
        x = 40.0 * next(batches)
    with torch.no_grad():
        error = (crosscoder(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(error) < 0.2, float(error)  # (about 0.01)
    # The norm factor went into the normaliser, not the biases: it reads raw rows at ~1/40 their size.
    assert torch.all((crosscoder.activation_scale > 1 / 400) & (crosscoder.activation_scale < 1 / 4))


def test_scale_biases_lets_a_crosscoder_read_inputs_of_another_scale():
    """The codes of x under scale_biases(f) are those of x / f before it, and reconstructions scale by f;
    scale_biases(1 / f) undoes it (trainSAE calls both around a checkpoint)."""
    import copy

    from mneme_plugin.crosscoder.config import CrossCoderConfig
    from mneme_plugin.crosscoder.model import BatchTopKCrossCoder

    for normalization in ("scale", "mean_scale"):
        cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=8, dict_size=32, k=3, normalization=normalization))
        cc.reset_parameters(torch.Generator().manual_seed(0))
        cc.set_activation_scale([0.5, 2.0])
        with torch.no_grad():
            cc.threshold.fill_(0.1)
            if normalization == "mean_scale":
                cc.activation_mean.copy_(torch.randn(2, 8))
        x = torch.randn(50, 2, 8)
        scaled = copy.deepcopy(cc)
        scaled.scale_biases(7.0)
        assert torch.allclose(scaled.encode(7.0 * x), cc.encode(x), atol=1e-5)
        assert torch.allclose(scaled(7.0 * x), 7.0 * cc(x), rtol=1e-4, atol=1e-4)
        scaled.scale_biases(1 / 7.0)
        assert torch.allclose(scaled.encode(x), cc.encode(x), atol=1e-5)


def test_damaged_trainsae_output_is_refused_naming_the_file(tmp_path):
    """ae.pt with NaN weights (a diverged run, a damaged copy) loaded without a word, where every other reader
    refuses non-finite weights; a config our trainer does not write raised a ConfigError naming no file."""
    import json

    import pytest
    from dictionary_learning.training import trainSAE

    from mneme_plugin.errors import CheckpointError

    trainSAE(_planted_batches(), [dict(trainer=BatchTopKCrossCoderTrainer, steps=20, activation_dim=16, dict_size=64,
                                       k=4, batch_size=256, device="cpu", layer=3, lm_name="tiny", seed=0)],
             steps=20, save_dir=str(tmp_path / "dl"), device="cpu")
    folder = tmp_path / "dl" / "trainer_0"
    good = torch.load(folder / "ae.pt", weights_only=True)
    damaged = {**good, "W_dec": good["W_dec"].clone()}
    damaged["W_dec"][1, 5, :3] = float("nan")
    torch.save(damaged, folder / "ae.pt")
    with pytest.raises(CheckpointError, match=r"ae.pt: tensor 'W_dec' holds 3 non-finite values"):
        load_crosscoder(folder)
    torch.save(good, folder / "ae.pt")
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["k"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"trainer_0/config.json describes no crosscoder .*k must be at most"):
        load_crosscoder(folder)
