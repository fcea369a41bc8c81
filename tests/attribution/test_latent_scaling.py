"""Latent scaling: planted betas exactly, brute-force least squares, streaming = one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mneme_plugin.attribution import AttributionConfig, LatentScalingAccumulator, attribute, closed_form_betas
from tests.helpers import planted_scaling_problem, random_activation_pairs, write_activation_store


@pytest.mark.parametrize("batch_size", [3000, 257])
def test_planted_betas_are_recovered_exactly(batch_size):
    p = planted_scaling_problem(n=3000, m=12, d=32, seed=0)
    acc = LatentScalingAccumulator(p.W_dec, p.b_dec)
    for f, x in zip(p.f.split(batch_size), p.x_norm.split(batch_size)):
        acc.update_codes(f, x)
    out = acc.finalize()
    for target, beta in p.beta.items():
        torch.testing.assert_close(out[f"beta_{target}"], beta, rtol=0, atol=1e-8)
    torch.testing.assert_close(out["nu_r"], p.beta["r_base"], rtol=0, atol=1e-8)
    torch.testing.assert_close(out["nu_e"], p.beta["e_base"] / p.beta["e_edited"], rtol=0, atol=1e-8)
    assert acc.n_tokens == 3000
    assert torch.equal(out["fire_count"], (p.f != 0).sum(0))


def test_closed_form_on_constructed_targets():
    p = planted_scaling_problem(n=500, m=8, d=24, seed=3)
    F, D = p.f, p.W_dec[1]
    beta = torch.linspace(-2, 3, 8, dtype=torch.float64)
    ortho_noise = p.x_norm[:, 0] - (p.x_norm[:, 0] @ D.T) @ torch.linalg.pinv(D).T  # noise off the rows
    Y = (F * beta) @ D + ortho_noise
    got = closed_form_betas(F.T @ Y, F.pow(2).sum(0), D)
    torch.testing.assert_close(got, beta, rtol=0, atol=1e-8)
    # Invariant to moving scale between f and the vector.
    got_scaled = closed_form_betas((3 * F).T @ Y, (3 * F).pow(2).sum(0), D / 3)
    torch.testing.assert_close(got_scaled, beta, rtol=0, atol=1e-8)


def _brute_force(cc, x, j, vector_model):
    """Per-latent least squares with torch.linalg.lstsq, the four targets built explicitly."""
    with torch.no_grad():
        f = cc.encode(x).double()
        xn = cc.normalize(x).double()
        W, b = cc.W_dec.detach().double(), cc.b_dec.detach().double()
        x_hat = torch.einsum("bm,lmd->bld", f, W) + b
    fj = f[:, j]
    v = W[vector_model, j]
    A = (fj[:, None] * v[None, :]).reshape(-1, 1)
    targets = {
        "r_base": x_hat[:, 0], "r_edited": x_hat[:, 1],
        "e_base": xn[:, 0] - x_hat[:, 0] + fj[:, None] * W[0, j],
        "e_edited": xn[:, 1] - x_hat[:, 1] + fj[:, None] * W[1, j],
    }
    return {t: torch.linalg.lstsq(A, y.reshape(-1, 1)).solution.item() for t, y in targets.items()}


def test_vectorised_betas_equal_brute_force_least_squares(random_crosscoder):
    cc = random_crosscoder
    x = random_activation_pairs(3000, 16, seed=5)
    result = attribute(cc, x, AttributionConfig(batch_size=700, device="cpu"), progress=False)
    table = result.table
    fired = table.index[table["fire_count"] > 20].to_numpy()
    assert len(fired) >= 10
    for j in fired[:: max(1, len(fired) // 8)]:
        for prefix, vector_model in (("beta", 1), ("mbeta", 0)):
            ref = _brute_force(cc, x, int(j), vector_model)
            for target, value in ref.items():
                got = table.loc[j, f"{prefix}_{target}"]
                assert got == pytest.approx(value, rel=1e-5, abs=1e-5), (j, prefix, target)


def test_streaming_shards_equals_one_pass_over_concatenation(random_crosscoder, tmp_path):
    cc = random_crosscoder
    x = random_activation_pairs(2500, 16, seed=7)
    store = write_activation_store(tmp_path / "store", x, rows_per_shard=800, scale_factors=[0.5, 2.0])
    streamed = attribute(cc, store, AttributionConfig(batch_size=300, device="cpu"), progress=False).table
    whole = attribute(cc, x, AttributionConfig(batch_size=2500, device="cpu"), progress=False).table
    assert streamed["fire_count"].sum() > 0
    numeric = [c for c in streamed.columns if streamed[c].dtype.kind == "f"]
    # Accumulation is float64; the codes come from float32 encoding, whose last bits may depend on the batch size.
    np.testing.assert_allclose(streamed[numeric].to_numpy(), whole[numeric].to_numpy(), rtol=1e-6, atol=1e-9)
    assert (streamed["latent_class"] == whole["latent_class"]).all()

    # merge(): two accumulators over halves = one over everything.
    a, b, c = (LatentScalingAccumulator.from_crosscoder(cc) for _ in range(3))
    a.update(x[:1000]); b.update(x[1000:]); c.update(x)
    merged, one = a.merge(b).finalize(), c.finalize()
    for key in one:
        torch.testing.assert_close(merged[key], one[key], rtol=1e-9, atol=1e-9, equal_nan=True)


def test_memory_of_the_accumulator_does_not_depend_on_tokens(random_crosscoder):
    acc = LatentScalingAccumulator.from_crosscoder(random_crosscoder)
    sizes = lambda: sum(t.numel() for t in (acc.fty, acc.sum_f, acc.sum_f2, acc.count))  # noqa: E731
    before = sizes()
    for seed in range(3):
        acc.update(random_activation_pairs(1000, 16, seed=seed))
    assert sizes() == before == 64 * 4 * 16 + 3 * 64


def test_dense_path_equals_sparse_path(random_crosscoder, monkeypatch):
    import mneme_plugin.attribution.latent_scaling as ls

    x = random_activation_pairs(1500, 16, seed=11)
    sparse = LatentScalingAccumulator.from_crosscoder(random_crosscoder)
    sparse.update(x)
    monkeypatch.setattr(ls, "DENSE_FRACTION", 0.0)
    dense = LatentScalingAccumulator.from_crosscoder(random_crosscoder)
    dense.update(x)
    a, b = sparse.finalize(), dense.finalize()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10, equal_nan=True)


def test_decoupled_crosscoders_are_refused_clearly():
    from mneme_plugin.crosscoder import CrossCoderConfig, DecoupledBatchTopKCrossCoder
    from mneme_plugin.errors import ConfigError

    decoupled = DecoupledBatchTopKCrossCoder(CrossCoderConfig(activation_dim=16, dict_size=64, k=4, salience="decoupled"))
    with pytest.raises(ConfigError, match="DECOUPLED"):
        LatentScalingAccumulator.from_crosscoder(decoupled)
