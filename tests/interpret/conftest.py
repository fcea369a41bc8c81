"""Fixtures of the interpretation tests: a thresholded random crosscoder, a collect run."""

from __future__ import annotations

import pytest
import torch

from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig
from tests.helpers import synthetic_corpus


@pytest.fixture(scope="session")
def thresholded_crosscoder():
    """A random crosscoder (d=32, m=48) with an inference threshold: per-token, batch-independent codes."""
    torch.manual_seed(0)
    cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=32, dict_size=48, k=4))
    cc.reset_parameters(generator=torch.Generator().manual_seed(0))
    cc.threshold.fill_(0.005)  # salience ~ 0.02 * pre: about a quarter of tokens fire per latent
    return cc.eval()


@pytest.fixture(scope="session")
def collect_corpus():
    return synthetic_corpus(80, seed=3)


@pytest.fixture(scope="session")
def collected(tmp_path_factory, ht_pair, thresholded_crosscoder, collect_corpus):
    from mneme_plugin.activations import HarvestConfig
    from mneme_plugin.interpret import CollectConfig, collect

    out = tmp_path_factory.mktemp("collect")
    cfg = CollectConfig(latents=[0, 3, 5, 7, 11, 20], n_top=6, n_random=4, n_non_activating=5,
                        example_ctx_len=16, harvest=HarvestConfig(layer=1, context_length=32, batch_size=4))
    base, edited = ht_pair
    result = collect(base, edited, thresholded_crosscoder, collect_corpus, cfg, out_dir=out, progress=False)
    return out, cfg, result
