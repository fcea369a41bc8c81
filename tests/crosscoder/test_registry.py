"""The crosscoder class registry: architecture dispatch, old config.json files, capability errors."""

from __future__ import annotations

import json

import pytest
import torch

from mneme_plugin import attribution
from mneme_plugin.crosscoder import (
    CROSSCODER_CLASS_REGISTRY,
    BatchTopKCrossCoder,
    CrossCoder,
    CrossCoderConfig,
    DecoupledBatchTopKCrossCoder,
    JumpReLUCrossCoder,
    ReLUCrossCoder,
    build_crosscoder,
    register_crosscoder_class,
)
from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.formats import export_saelens, load_crosscoder

D, M = 8, 24


def _random(cls, **config):
    cc = cls(CrossCoderConfig(activation_dim=D, dict_size=M, k=3, **config))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        cc.activation_scale.copy_(torch.tensor([0.8, 1.3]))
    return cc.eval()


VARIANTS = {
    "batchtopk": (BatchTopKCrossCoder, {}),
    "batchtopk_decoupled": (DecoupledBatchTopKCrossCoder, {"salience": "decoupled"}),
    "relu": (ReLUCrossCoder, {"sparsity": "relu", "normalization": "mean_scale"}),
    "jumprelu": (JumpReLUCrossCoder, {"sparsity": "jumprelu"}),
}


@pytest.mark.parametrize("architecture", sorted(VARIANTS))
def test_config_json_written_before_the_architecture_key_still_loads(tmp_path, architecture):
    cls, config = VARIANTS[architecture]
    cc = _random(cls, **config)
    if architecture == "jumprelu":
        cc.latent_threshold.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    if architecture == "relu":
        cc.activation_mean.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(32, 2, D, generator=torch.Generator().manual_seed(3))
    cc.save_pretrained(tmp_path / "cc")
    meta = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert meta["architecture"] == architecture and meta["class"] == cls.__name__
    # An older file: the same, without the key (its class is inferred from the config's flags).
    del meta["architecture"]
    (tmp_path / "cc" / "config.json").write_text(json.dumps(meta))
    for loader in (CrossCoder.from_pretrained, load_crosscoder):
        back = loader(tmp_path / "cc")
        assert type(back) is cls and back.cfg == cc.cfg
        for name in cc.tensor_names():
            assert torch.equal(getattr(back, name), getattr(cc, name)), name
        assert torch.equal(back.encode(x, use_threshold=False), cc.encode(x, use_threshold=False))


def test_the_architecture_key_picks_the_class_and_must_fit_the_config(tmp_path):
    _random(ReLUCrossCoder, sparsity="relu").save_pretrained(tmp_path / "relu")
    with pytest.raises(CheckpointError, match="holds a ReLUCrossCoder .*not a BatchTopKCrossCoder"):
        BatchTopKCrossCoder.from_pretrained(tmp_path / "relu")
    meta = json.loads((tmp_path / "relu" / "config.json").read_text())
    (tmp_path / "relu" / "config.json").write_text(json.dumps({**meta, "architecture": "jumprelu"}))
    with pytest.raises(CheckpointError, match="sparsity is 'relu', expected 'jumprelu'"):
        CrossCoder.from_pretrained(tmp_path / "relu")
    (tmp_path / "relu" / "config.json").write_text(json.dumps({**meta, "architecture": "matryoshka"}))
    with pytest.raises(CheckpointError, match="Unknown crosscoder architecture 'matryoshka'; registered: .*relu"):
        CrossCoder.from_pretrained(tmp_path / "relu")
    # A class refuses a config of another architecture.
    with pytest.raises(ConfigError, match="salience 'decoupled' needs per-model codes"):
        BatchTopKCrossCoder(CrossCoderConfig(activation_dim=D, dict_size=M, k=3, salience="decoupled"))
    assert type(build_crosscoder(CrossCoderConfig(activation_dim=D, dict_size=M, k=3, sparsity="relu"))) is ReLUCrossCoder


class TopTwoPerTokenCrossCoder(CrossCoder):
    """A toy architecture registered from a test: each token keeps its two largest pre-activations."""

    architecture = "toy_top2"
    description = "toy: top 2 latents per token"

    def sparsify(self, pre, use_threshold=None):
        top = pre.topk(2, dim=1)
        return torch.zeros_like(pre).scatter_(1, top.indices, top.values)


@pytest.fixture
def toy_architecture():
    register_crosscoder_class("toy_top2", TopTwoPerTokenCrossCoder)
    yield TopTwoPerTokenCrossCoder
    del CROSSCODER_CLASS_REGISTRY["toy_top2"]


def test_a_registered_architecture_goes_through_the_stages_or_is_refused_clearly(tmp_path, toy_architecture):
    cc = _random(toy_architecture)
    cc.threshold.fill_(0.0)  # no batch dependence
    x = torch.randn(200, 2, D, generator=torch.Generator().manual_seed(4))
    cc.save_pretrained(tmp_path / "toy")
    back = load_crosscoder(tmp_path / "toy")
    assert type(back) is toy_architecture
    f = back.encode(x)
    assert torch.equal((f > 0).sum(dim=1).clamp(max=2), (f > 0).sum(dim=1)) and (f > 0).any()
    # Attribution needs a shared code, which the toy has: it runs on it.
    table = attribution.attribute(tmp_path / "toy", x, {"batch_size": 64, "device": "cpu"}, progress=False).table
    assert len(table) == M and (table["fire_count"] > 0).any()
    # The SAE-Lens export needs per-latent jumprelu thresholds, which the toy lacks: refused, naming them.
    with pytest.raises(ConfigError, match=r"TopTwoPerTokenCrossCoder .*jumprelu_thresholds"):
        export_saelens(back, tmp_path / "export")


def test_stages_needing_a_shared_code_name_what_a_decoupled_crosscoder_lacks():
    cc = _random(DecoupledBatchTopKCrossCoder, salience="decoupled")
    cc.set_model_thresholds([0.1, 0.2])
    x = torch.randn(50, 2, D, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ConfigError, match=r"one code per latent shared by both models \(capability 'shared_code'\); "
                                          r"DecoupledBatchTopKCrossCoder .*DECOUPLED"):
        attribution.attribute(cc, x, {"batch_size": 64, "device": "cpu"}, progress=False)
    assert not DecoupledBatchTopKCrossCoder.shared_code and BatchTopKCrossCoder.shared_code
