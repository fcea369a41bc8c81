import pytest
import torch

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth import domain_accuracy
from mneme_plugin.interventions import FineTuneConfig, RMUConfig, fine_tune, rmu_losses, rmu_unlearn
from tests.helpers import make_fact_lm

DOMAINS = ["biology", "cooking", "sports"]


@pytest.fixture(scope="module")
def small_organism():
    """A 2-layer LM that knows the facts of 3 domains (about 10 s on one core)."""
    return make_fact_lm(DOMAINS)


def test_configs_validate():
    assert RMUConfig(layer=7).update_layers == (5, 6, 7)
    assert RMUConfig(layer=1).update_layers == (0, 1)
    for bad in (dict(layer=-1), dict(layer=2, update_layers=(3,)), dict(update_layers=()), dict(steering_coef=0),
                dict(alpha=-1), dict(steps=0), dict(lr=0)):
        with pytest.raises(ConfigError):
            RMUConfig(**bad)
    for bad in (dict(steps=0), dict(lr=-1), dict(batch_size=0), dict(weight_decay=-0.1)):
        with pytest.raises(ConfigError):
            FineTuneConfig(**bad)
    assert RMUConfig(layer=3).to_dict()["update_layers"] == [1, 2, 3]


def test_rmu_unlearns_the_forget_domain_and_bounds_the_retain_loss(small_organism):
    model, questions, edit = small_organism
    before = domain_accuracy(model, questions)
    assert min(before.values()) >= 0.6, before
    forget = [t for d, t in edit if d == "biology"]
    retain = [t for d, t in edit if d != "biology"]
    cfg = RMUConfig(layer=1, steering_coef=30.0, alpha=3.0, lr=5e-3, steps=120, batch_size=8, context_length=32)
    with pytest.raises(ConfigError, match="out of range"):
        rmu_unlearn(model, forget, retain, RMUConfig(layer=2))
    W = {n: p.clone() for n, p in model.named_parameters()}
    result = rmu_unlearn(model, forget, retain, cfg)
    # The input model is untouched; in the copy only the chosen MLP W_out changed.
    assert all(torch.equal(W[n], p) for n, p in model.named_parameters())
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(W[n], p)}
    assert changed == {"blocks.0.mlp.W_out", "blocks.1.mlp.W_out"}
    after = domain_accuracy(result.model, questions)
    assert after["biology"] <= before["biology"] - 0.4, (before, after)
    assert result.forget_loss[-1] < 0.5 * result.forget_loss[0]
    fl, rl = rmu_losses(result.model, model, forget, retain, cfg, result.control_vector)
    fl0, _ = rmu_losses(model, model, forget, retain, cfg, result.control_vector)
    assert fl < 0.5 * fl0
    resid_var = rmu_losses(model, model, retain, retain, cfg, torch.zeros(48))[0]  # mean square of h_L on retain
    assert rl < 0.25 * resid_var, (rl, resid_var)


def test_fine_tuning_trains_a_copy_and_lowers_its_loss(small_organism):
    model, _, edit = small_organism
    texts = [t for d, t in edit if d == "cooking"]
    W = {n: p.clone() for n, p in model.named_parameters()}
    result = fine_tune(model, texts, FineTuneConfig(steps=15, lr=3e-3, batch_size=8, context_length=32))
    assert all(torch.equal(W[n], p) for n, p in model.named_parameters())
    assert any(not torch.equal(W[n], p) for n, p in result.model.named_parameters())
    assert not any(p.requires_grad for p in result.model.parameters())
    assert len(result.loss) == 15 and result.loss[-1] < result.loss[0]
