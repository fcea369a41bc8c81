"""Import of science-of-finetuning and Kissane crosscoders, checked against the published formulas."""

import pytest
import torch

from mneme_plugin.crosscoder import BatchTopKCrossCoder
from mneme_plugin.crosscoder.provenance import layer_of_hook, recorded_reading
from mneme_plugin.formats import detect_format, import_crosscoder, load_crosscoder
from tests.formats import reference as ref
from tests.helpers import (
    kissane_state_dict,
    sof_state_dict,
    write_kissane_crosscoder,
    write_sof_crosscoder,
)

D, M, K = 16, 48, 4


def _inputs(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, 2, D, generator=gen) + 0.5


def _cut(values):
    """Midway between two neighbouring positive values at the 70% point: no ties with any value."""
    v = values[values > 0].sort().values
    i = int(0.7 * v.numel())
    return float((v[i] + v[i + 1]) / 2)


def _median_threshold(sd, code_norm, x):
    """A threshold that keeps a fair share of latents (estimated as their code would)."""
    pre = ref.sof_pre(sd, x, 2 if code_norm == "DECOUPLED" else 1)
    w = ref.sof_weight(sd, code_norm)
    if code_norm == "DECOUPLED":
        scaled = pre[:, None, :] * w[None]
        return [_cut(scaled[:, layer]) for layer in range(2)]
    return _cut(pre * w)


@pytest.mark.parametrize("code_norm", ["CROSSCODER", "SAE", "MIXED", "NONE", "DECOUPLED"])
@pytest.mark.parametrize("normalizer", [True, False])
def test_sof_batch_topk_every_code_normalisation(tmp_path, code_norm, normalizer):
    x = _inputs()
    sd = sof_state_dict(D, M, K, code_norm, normalizer=normalizer, seed=3)
    sd["threshold"] = torch.tensor(_median_threshold(sd, code_norm, x), dtype=torch.float32)
    folder = write_sof_crosscoder(tmp_path / "hub", sd, "hub", code_normalization=code_norm, k=K)
    assert detect_format(folder) == "science-of-finetuning"
    cc = load_crosscoder(folder)
    assert isinstance(cc, BatchTopKCrossCoder)
    assert cc.cfg.normalization == ("mean_scale" if normalizer else "scale")

    expected = ref.sof_encode(sd, x, code_norm)
    f = cc.encode(x)
    assert int(cc.k) == K
    if code_norm == "DECOUPLED":
        # Their codes (B, L, F); ours the union (B, F), with the per-model codes available.
        torch.testing.assert_close(cc.encode_per_model(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f, expected.amax(dim=1), rtol=1e-5, atol=1e-5)
        assert cc.threshold >= 0 and cc.model_thresholds.shape == (2,)
    else:
        torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-5)
        assert 0 < (f > 0).float().mean() < 0.5
    # Reconstructions equal theirs, in raw space.
    torch.testing.assert_close(cc.decode(f), ref.sof_decode(sd, expected), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cc(x), ref.sof_decode(sd, expected), rtol=1e-4, atol=1e-4)
    # Saved in our own format: round trip exact.
    out = import_crosscoder(folder, tmp_path / "ours")
    again = load_crosscoder(out)
    assert again.cfg == cc.cfg
    for name in cc.tensor_names():
        assert torch.equal(getattr(again, name), getattr(cc, name)), name
    assert torch.equal(again.encode(x), f) and torch.equal(again(x), cc(x))
    assert BatchTopKCrossCoder.from_pretrained(out).cfg == cc.cfg


def test_sof_batch_topk_without_threshold_matches_their_batch_topk(tmp_path, caplog):
    """Their encode() with threshold -1 keeps every positive pre-activation (no sparsity); the import
    encodes as their encode(use_threshold=False), BatchTopK, and says so."""
    x = _inputs(32)
    sd = sof_state_dict(D, M, K, "SAE", seed=5)  # threshold -1: never estimated
    with caplog.at_level("WARNING", logger="mneme_plugin"):
        cc = load_crosscoder(write_sof_crosscoder(tmp_path / "hub", sd, "hub", code_normalization="SAE", k=K))
    assert "threshold was never estimated" in caplog.text and "use_threshold=False" in caplog.text
    assert torch.equal(ref.sof_encode(sd, x, "SAE"), ref.sof_pre(sd, x))  # theirs with the threshold: no selection
    pre = ref.sof_pre(sd, x)
    scaled = (pre * ref.sof_weight(sd, "SAE")).flatten()
    top = scaled.topk(K * x.shape[0]).indices
    expected = torch.zeros_like(scaled).scatter_(0, top, pre.flatten()[top]).reshape(pre.shape)
    torch.testing.assert_close(cc.encode(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["local", "checkpoint"])
def test_sof_local_training_output_with_compile_prefixes(tmp_path, layout):
    x = _inputs()
    sd = sof_state_dict(D, M, K, "CROSSCODER", seed=7)
    sd["threshold"] = torch.tensor(_median_threshold(sd, "CROSSCODER", x))
    folder = write_sof_crosscoder(tmp_path / "run", sd, layout, compiled=True, k=K)
    if layout == "checkpoint":  # the newest checkpoint wins
        write_sof_crosscoder(tmp_path / "run", sof_state_dict(D, M, K, seed=99), layout, compiled=True, step=20)
    cc = load_crosscoder(folder)
    assert cc.cfg.metadata["lm_name"] == "google/gemma-2-2b" and cc.cfg.metadata["layer"] == 13
    torch.testing.assert_close(cc.encode(x), ref.sof_encode(sd, x, "CROSSCODER"), rtol=1e-5, atol=1e-5)
    # It records its layer, not a hook: the SAE-Lens export is named after the residual stream after it.
    from mneme_plugin.formats import export_saelens

    written = export_saelens(cc, tmp_path / "export" / layout)
    assert written["concat"].name == "blocks.13.hook_resid_post"


def test_sof_l1_crosscoder_old_checkpoint(tmp_path):
    """The L1 CrossCoder: codes are the ReLU pre-activations; an old file lacks id and normaliser."""
    x = _inputs()
    sd = sof_state_dict(D, M, batch_topk=False, normalizer=False, seed=11)
    for key in ("code_normalization_id", "activation_mean", "activation_std", "activation_global_scale", "target_rms"):
        del sd[key]
    folder = write_sof_crosscoder(tmp_path / "l1", sd, "local", dict_class="CrossCoder")
    cc = load_crosscoder(folder)
    assert cc.cfg.sparsity == "relu" and cc.cfg.salience == "crosscoder"
    expected = ref.sof_encode(sd, x, "CROSSCODER", batch_topk=False)
    torch.testing.assert_close(cc.encode(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc(x), ref.sof_decode(sd, expected), rtol=1e-4, atol=1e-4)
    # Single tokens encode like the batch (no batch dependence).
    torch.testing.assert_close(cc.encode(x[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def test_sof_decoupled_batch_topk_per_model(tmp_path):
    x = _inputs(32)
    sd = sof_state_dict(D, M, K, "DECOUPLED", seed=13)
    cc = load_crosscoder(write_sof_crosscoder(tmp_path / "hub", sd, "hub", code_normalization="DECOUPLED", k=K))
    assert ref.sof_has_normalizer(sd)
    pre = ref.sof_pre(sd, x, normalizations=2)  # their DECOUPLED encode normalises twice (reference.py)
    scaled = pre[:, None] * ref.sof_weight(sd, "DECOUPLED")[None]
    expected = torch.zeros(x.shape[0], 2, M)
    for layer in range(2):
        top = scaled[:, layer].flatten().topk(K * x.shape[0]).indices
        mask = torch.zeros(x.shape[0] * M, dtype=torch.bool)
        mask[top] = True
        expected[:, layer] = pre * mask.reshape(pre.shape)
    torch.testing.assert_close(cc.encode_per_model(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc(x), ref.sof_decode(sd, expected), rtol=1e-4, atol=1e-4)


def test_kissane_with_and_without_scale_factors(tmp_path):
    x = _inputs()
    sd = kissane_state_dict(D, M, seed=17)
    folder = write_kissane_crosscoder(tmp_path / "repo", sd)
    scale = torch.tensor([0.7, 1.9])
    # The repo root holds one folder per hook: found without naming it.
    cc = load_crosscoder(tmp_path / "repo", scale_factors=scale.tolist())
    assert cc.cfg.metadata["hook_name"] == "blocks.14.hook_resid_pre" and cc.cfg.sparsity == "relu"
    # Their files name the hook point, not the layer: collect reads at the hook, in block 14.
    assert recorded_reading(cc) == {"layer": 14, "hook_name": "blocks.14.hook_resid_pre"}
    expected = ref.kissane_encode(sd, x * scale[None, :, None])
    torch.testing.assert_close(cc.encode(x), expected, rtol=1e-5, atol=1e-5)
    # Their decode is in scaled space; ours returns raw activations.
    torch.testing.assert_close(cc.decode(expected) * scale[None, :, None], ref.kissane_decode(sd, expected),
                               rtol=1e-5, atol=1e-5)
    plain = load_crosscoder(folder)
    torch.testing.assert_close(plain.encode(x), ref.kissane_encode(sd, x), rtol=1e-5, atol=1e-5)
    out = import_crosscoder(folder, tmp_path / "ours", scale_factors=scale.tolist())
    assert torch.equal(load_crosscoder(out)(x), cc(x))


@pytest.mark.parametrize("hook, layer", [("blocks.14.hook_resid_pre", 14), ("blocks.0.attn.hook_z", 0),
                                         ("hook_embed", None), ("blocks.x.hook_resid_post", None), (14, None)])
def test_the_layer_of_a_hook_name(hook, layer):
    assert layer_of_hook(hook) == layer


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_bare_kissane_weights_file_is_detected_by_its_tensor_names(tmp_path, zip_format):
    """Detection reads a torch.save file's names through a memory map (nothing loaded); a file of torch's legacy
    format, which cannot be mapped, is read in full instead."""
    sd = kissane_state_dict(D, M, seed=3)
    path = tmp_path / "my_crosscoder.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert detect_format(path) == "kissane"
    torch.testing.assert_close(load_crosscoder(path).W_dec, sd["W_dec"].permute(1, 0, 2))
