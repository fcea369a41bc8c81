"""The trainer: dictionary_learning's trainSAE runs it, and it recovers planted directions."""

import json

import pytest
import torch
from dictionary_learning.training import trainSAE

from mneme_plugin.crosscoder import BatchTopKCrossCoder, BatchTopKCrossCoderTrainer, CrossCoderConfig, TrainingConfig
from mneme_plugin.crosscoder.trainer import lr_multiplier
from mneme_plugin.errors import ConfigError
from mneme_plugin.crosscoder.planted import planted_pair_data


def _batches(x: torch.Tensor, batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield x[torch.randint(0, x.shape[0], (batch_size,), generator=gen)]


def test_trainsae_runs_our_trainer_and_it_recovers_planted_directions(tmp_path):
    data = planted_pair_data(d=64, seed=0)
    steps = 2000
    trainer_config = {
        "trainer": BatchTopKCrossCoderTrainer,
        "steps": steps,
        "activation_dim": 64,
        "dict_size": 256,
        "k": 2,
        "lr": 1e-3,
        "warmup_steps": 50,
        "threshold_start_step": 1000,
        "dead_after_tokens": 50_000,
        "device": "cpu",
        "seed": 0,
        "layer": 3,
        "lm_name": "planted",
    }
    trainSAE(_batches(data.x, 512, seed=0), [trainer_config], steps=steps, save_dir=str(tmp_path), device="cpu")

    saved = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["trainer"]
    assert saved["dict_class"] == "BatchTopKCrossCoder" and saved["k"] == 2
    model = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=64, dict_size=256, k=2, salience=saved["salience"]))
    model.load_state_dict(torch.load(tmp_path / "trainer_0" / "ae.pt", weights_only=True))
    assert model.threshold > 0  # estimated during training

    decoder = model.W_dec.detach()  # (2, m, d)
    latents = torch.cat([decoder[0], decoder[1]], dim=-1)
    truth = data.directions.reshape(len(data.kind), -1)
    cos = torch.nn.functional.normalize(truth, dim=-1) @ torch.nn.functional.normalize(latents, dim=-1).T
    best_cos, best = cos.max(dim=1)
    recovered = best_cos > 0.9
    assert recovered.float().mean() >= 0.9, best_cos

    for i, kind in enumerate(data.kind):
        if kind == "shared" or not recovered[i]:
            continue
        base_norm, edited_norm = decoder[0, best[i]].norm(), decoder[1, best[i]].norm()
        if kind == "base_only":
            assert edited_norm < 0.05 * base_norm, (i, base_norm, edited_norm)
        else:
            assert base_norm < 0.05 * edited_norm, (i, base_norm, edited_norm)

    # The reconstruction is near perfect with the inference threshold.
    x = data.x[:2000]
    err = (model(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert err < 0.02


def test_lr_schedule_warms_up_and_decays_to_zero():
    values = [lr_multiplier(s, 100, 10, 0.2) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0 and values[50] == 1.0
    assert values[80] == 1.0 and 0 < values[99] < values[90] < 1.0


def test_dead_latents_are_counted_and_get_the_aux_loss():
    torch.manual_seed(0)
    trainer = BatchTopKCrossCoderTrainer(
        steps=10, activation_dim=8, dict_size=64, k=1, dead_after_tokens=64, device="cpu", warmup_steps=0, lr=6.4e-3
    )  # lr pinned: the same batch every step, so how many latents win the 32 slots depends on the step size
    x = torch.randn(32, 2, 8)
    for step in range(3):
        trainer.update(step, x)
    assert trainer.dead_fraction > 0.5  # at most 64 latents fired, most are dead after 64 tokens
    aux_before = trainer.last_losses.aux_loss
    assert aux_before > 0
    losses = [trainer.update(step, x) for step in range(2, 10)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_training_losses_are_the_squared_error_or_the_mean_error_norm_per_row_and_model():
    torch.manual_seed(0)
    x = torch.randn(16, 2, 8)
    assert TrainingConfig().loss == "norm_1.25"
    for kind in ("squared", "norm", "norm_1.25"):
        trainer = BatchTopKCrossCoderTrainer(steps=10, activation_dim=8, dict_size=32, k=2, loss=kind, aux_alpha=0.0,
                                             device="cpu")
        with torch.no_grad():
            error = x - trainer.ae(x)  # unit activation scale: raw and normalised space coincide
        per_row_model = [[float(error[b, m].pow(2).sum()) for m in range(2)] for b in range(16)]
        if kind == "squared":
            expected = sum(sum(r) for r in per_row_model) / 16
        else:
            power = 1.0 if kind == "norm" else 1.25
            expected = sum(v ** (power / 2) for r in per_row_model for v in r) / 32
        assert float(trainer.loss(x).detach()) == pytest.approx(expected, rel=1e-5)


def test_adams_second_moment_decay_is_the_configured_one():
    """Adam's beta2 is ``training.adam_beta2`` (0.95 by default; 0.999 the published trainers'): after one
    step Adam holds m = (1 - beta1) g and v = (1 - beta2) g^2, so v / m^2 = (1 - beta2) / (1 - beta1)^2
    whatever the gradient."""
    torch.manual_seed(0)
    x = torch.randn(64, 2, 8)
    assert TrainingConfig().adam_beta2 == 0.95
    for beta2 in (0.95, 0.999):
        trainer = BatchTopKCrossCoderTrainer(steps=10, activation_dim=8, dict_size=32, k=4, device="cpu",
                                             adam_beta2=beta2)
        trainer.update(0, x)
        for p in trainer.ae.parameters():
            state = trainer.optimizer.state[p]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            moved = m.abs() > 1e-6
            assert moved.any()
            ratio = v[moved] / m[moved].pow(2)
            assert torch.allclose(ratio, torch.full_like(ratio, (1 - beta2) / 0.1**2), rtol=1e-3), beta2
    with pytest.raises(ConfigError, match="adam_beta2 must be in"):
        TrainingConfig(adam_beta2=1.0)


def test_unknown_training_loss_is_refused():
    with pytest.raises(ConfigError, match="loss must be one of"):
        TrainingConfig(loss="l1")


def test_k_annealing_keeps_more_latents_early_and_k_from_the_threshold_start_on():
    torch.manual_seed(0)
    trainer = BatchTopKCrossCoderTrainer(steps=20, activation_dim=8, dict_size=64, k=2, k_anneal_factor=2.0,
                                         threshold_start_step=10, warmup_steps=0, device="cpu")
    x = torch.randn(16, 2, 8)
    l0 = {}
    for step in range(12):
        trainer.update(step, x)
        l0[step] = trainer.last_losses.l0
    # 2k at step 0, 1.5k halfway to the threshold start, k from it on (by hand: 4, 3, 2 per row).
    assert l0[0] == 4.0 and l0[5] == 3.0 and l0[10] == 2.0 and l0[11] == 2.0
    assert float(trainer.ae.threshold) > 0  # estimated from step 10, at k
    assert BatchTopKCrossCoderTrainer(steps=20, activation_dim=8, dict_size=64, k=2).k_at(0) == 2.0  # off by default


def test_inference_threshold_is_the_ema_of_the_smallest_kept_salience():
    # From threshold_start_step on, each step's smallest salience BatchTopK keeps (recomputed here by brute
    # force: a full sort of the batch's saliences with the step's weights) feeds the threshold: the first one
    # sets it, then theta <- beta * theta + (1 - beta) * smallest.
    torch.manual_seed(0)
    beta, start, k = 0.9, 3, 2
    trainer = BatchTopKCrossCoderTrainer(steps=20, activation_dim=8, dict_size=32, k=k, threshold_start_step=start,
                                         threshold_beta=beta, warmup_steps=0, device="cpu")
    gen = torch.Generator().manual_seed(1)
    expected = None
    for step in range(9):
        x = torch.randn(16, 2, 8, generator=gen) * (1 + step % 3)  # batches of different scales
        ae = trainer.ae
        with torch.no_grad():
            x_norm = ae.normalize(x).double()
            pre = torch.relu(torch.einsum("bld,ldm->bm", x_norm, ae.W_enc.double()) + ae.b_enc.double())
            salience = (pre * ae.salience_weights().double()).flatten()
        kept = salience.sort(descending=True).values[: k * x.shape[0]]
        smallest = float(kept[kept > 0].min())
        trainer.update(step, x)
        if step < start:
            assert float(trainer.ae.threshold) < 0  # not estimated yet
            continue
        expected = smallest if expected is None else beta * expected + (1 - beta) * smallest
        assert float(trainer.ae.threshold) == pytest.approx(expected, rel=1e-5), step


def test_k_anneal_factor_below_one_is_refused():
    with pytest.raises(ConfigError, match="k_anneal_factor"):
        TrainingConfig(k_anneal_factor=0.5)


def test_the_reused_salience_buffer_trains_exactly_as_fresh_tensors(monkeypatch):
    # The training step writes its (B, m) salience into a buffer kept from step to step on CPU; a
    # step must not read anything a previous step left there (same weights as fresh tensors).
    x = torch.randn(64, 2, 8, generator=torch.Generator().manual_seed(1))

    def train():
        torch.manual_seed(0)
        trainer = BatchTopKCrossCoderTrainer(steps=20, activation_dim=8, dict_size=32, k=2, device="cpu",
                                             dead_after_tokens=64, warmup_steps=0)
        for step in range(20):
            trainer.update(step, x[(step % 2) * 32:(step % 2 + 1) * 32] if step % 3 else x)
        return {name: p.detach().clone() for name, p in trainer.ae.named_parameters()}, trainer

    with_buffer, trainer = train()
    assert trainer.ae.__dict__.get("_salience_scratch") is not None  # the buffer was used
    assert "_salience_scratch" not in trainer.ae.state_dict()
    monkeypatch.setattr(BatchTopKCrossCoder, "_salience_buffer", lambda self, x_norm: None)
    fresh, _ = train()
    for name, value in fresh.items():
        assert torch.equal(with_buffer[name], value), name


@pytest.mark.parametrize(("salience", "given", "expected"), [
    ("crosscoder", None, 1.0),  # the published norm_init_scale, whatever the salience
    ("paper", None, 1.0),
    ("paper", 2.0, 2.0),
    ("crosscoder", 0.5, 0.5),
])
def test_decoder_rows_start_at_the_published_norm_unless_one_is_given(salience, given, expected):
    chosen = {} if given is None else {"decoder_init_norm": given}
    trainer = BatchTopKCrossCoderTrainer(steps=20, activation_dim=8, dict_size=64, k=2, salience=salience, seed=3,
                                         **chosen)
    norms = trainer.ae.W_dec.detach().norm(dim=-1)  # (models, latents): every row, per model
    torch.testing.assert_close(norms, torch.full_like(norms, expected))
    torch.testing.assert_close(trainer.ae.W_enc.detach(), trainer.ae.W_dec.detach().permute(0, 2, 1))
    assert trainer.training_config.decoder_init_norm == expected
    # The directions are the seed's whatever the norm: only the scale differs.
    unit = BatchTopKCrossCoderTrainer(steps=20, activation_dim=8, dict_size=64, k=2, salience=salience,
                                      seed=3).ae.W_dec.detach()
    torch.testing.assert_close(trainer.ae.W_dec.detach(), unit * expected)


def test_decoder_init_norm_reaches_the_trainer_from_the_yaml_config():
    training = TrainingConfig.from_dict({"steps": 20, "batch_size": 16, "decoder_init_norm": 1.5})
    crosscoder = CrossCoderConfig(activation_dim=8, dict_size=64, k=2, salience="paper")
    trainer = BatchTopKCrossCoderTrainer.from_configs(crosscoder, training)
    torch.testing.assert_close(trainer.ae.W_dec.detach().norm(dim=-1), torch.full((2, 64), 1.5))


@pytest.mark.parametrize("norm", [0.0, -1.0])
def test_a_non_positive_decoder_init_norm_is_refused(norm):
    with pytest.raises(ConfigError, match="decoder_init_norm must be positive"):
        TrainingConfig(decoder_init_norm=norm)
