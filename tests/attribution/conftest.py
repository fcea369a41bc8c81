"""A crosscoder trained on planted pair data (base-only features = what the edit lost), built once."""

from __future__ import annotations

import pytest
import torch

from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
from mneme_plugin.crosscoder.training import train
from mneme_plugin.crosscoder.planted import planted_pair_data
from tests.helpers import random_activation_pairs


class _Stream:
    """Endless seeded batches of the planted rows, with the factors train() reads."""

    def __init__(self, x: torch.Tensor, batch_size: int = 512) -> None:
        self.x, self.batch_size, self.d_model = x, batch_size, x.shape[-1]
        self.scale_factors = torch.ones(2)

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        while True:
            yield self.x[torch.randint(0, self.x.shape[0], (self.batch_size,), generator=gen)]


@pytest.fixture(scope="session")
def planted():
    return planted_pair_data(n=30_000, d=32, seed=0)


@pytest.fixture(scope="session")
def planted_crosscoder(planted, tmp_path_factory):
    run = train(
        _Stream(planted.x),
        tmp_path_factory.mktemp("planted_run"),
        crosscoder=CrossCoderConfig(activation_dim=32, dict_size=128, k=2),
        training=TrainingConfig(
            steps=1200, batch_size=512, lr=1e-3, warmup_steps=50, threshold_start_step=600,
            dead_after_tokens=50_000, eval_rows=1024, checkpoint_every=0, device="cpu",
        ),
        progress=False,
    )
    assert run.crosscoder.threshold > 0
    return run.crosscoder


@pytest.fixture(scope="session")
def random_crosscoder():
    """A random crosscoder (d=16, m=64) with a threshold giving a few active latents per token."""
    from mneme_plugin.crosscoder import BatchTopKCrossCoder

    torch.manual_seed(0)
    cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=16, dict_size=64, k=4))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cc.W_dec.mul_(1 + torch.rand(2, 64, 1, generator=gen) * 3)  # unequal norms per model
        cc.b_enc.copy_(0.01 * torch.randn(64, generator=gen))
        cc.b_dec.copy_(0.1 * torch.randn(2, 16, generator=gen))
        cc.set_activation_scale([0.5, 2.0])
        x = random_activation_pairs(2048, 16, seed=2)
        sal = cc.pre_activations(cc.normalize(x)) * cc.salience_weights()
        cc.threshold.copy_(sal.flatten().kthvalue(sal.numel() - 4 * 2048).values)
    return cc

