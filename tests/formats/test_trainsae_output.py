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

    trainSAE(_planted_batches(), [dict(trainer=BatchTopKCrossCoderTrainer, steps=150, activation_dim=16, dict_size=64,
                                       k=4, batch_size=256, device="cpu", layer=3, lm_name="tiny", seed=0)],
             steps=150, save_dir=str(tmp_path / "dl"), device="cpu")
    folder = tmp_path / "dl" / "trainer_0"
    assert detect_format(folder) == "dictionary-learning" and detect_format(folder / "ae.pt") == "dictionary-learning"
    crosscoder = load_crosscoder(folder)
    saved = torch.load(folder / "ae.pt", weights_only=True)
    assert set(saved) == set(crosscoder.state_dict())
    assert all(torch.equal(crosscoder.state_dict()[name], tensor) for name, tensor in saved.items())
    assert (crosscoder.cfg.dict_size, crosscoder.cfg.k, crosscoder.cfg.metadata["layer"]) == (64, 4, 3)
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
