import json

import pytest
import torch

from mneme_plugin.crosscoder import SALIENCE_MODES, BatchTopKCrossCoder, CrossCoderConfig
from mneme_plugin.errors import CheckpointError, ConfigError


def _model(salience: str = "paper", seed: int = 0) -> BatchTopKCrossCoder:
    torch.manual_seed(seed)
    model = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=16, dict_size=64, k=4, salience=salience))
    with torch.no_grad():
        model.W_dec.mul_(torch.rand(2, 64, 1) * 3)  # unequal norms, so salience modes differ
        model.b_enc.normal_(0, 0.05)
        model.b_dec.normal_(0, 0.1)
        model.threshold.fill_(0.02)
    model.set_activation_scale([0.5, 2.0])
    return model


def test_salience_modes_follow_their_formulas():
    W = torch.randn(2, 10, 6)
    nb, nf = W[0].norm(dim=-1), W[1].norm(dim=-1)
    torch.testing.assert_close(SALIENCE_MODES["paper"](W), nb**2 + nf**2)
    torch.testing.assert_close(SALIENCE_MODES["crosscoder"](W), nb + nf)
    torch.testing.assert_close(SALIENCE_MODES["sae"](W), (nb**2 + nf**2).sqrt())
    torch.testing.assert_close(SALIENCE_MODES["mixed"](W), (nb**2 + nf**2).sqrt() + 0.1 * (nb + nf))
    torch.testing.assert_close(SALIENCE_MODES["none"](W), torch.ones(10))


def test_encode_matches_definition_with_normalisation_inside():
    model = _model("crosscoder")
    x = torch.randn(8, 2, 16) * torch.tensor([3.0, 0.4])[None, :, None]
    scale = torch.tensor([0.5, 2.0])
    xs = x * scale[None, :, None]
    pre = torch.relu(torch.einsum("bld,ldm->bm", xs, model.W_enc) + model.b_enc)
    w = model.W_dec.norm(dim=-1).sum(0)
    expected = pre * (pre * w > 0.02)
    torch.testing.assert_close(model.encode(x), expected)
    expected_hat = (torch.einsum("bm,lmd->bld", expected, model.W_dec) + model.b_dec) / scale[None, :, None]
    torch.testing.assert_close(model.decode(model.encode(x)), expected_hat)


def test_threshold_encodes_single_tokens_like_the_batch():
    model = _model()
    x = torch.randn(32, 2, 16)
    batch_codes = model.encode(x)
    single = torch.cat([model.encode(x[i : i + 1]) for i in range(32)])
    torch.testing.assert_close(single, batch_codes)


def test_batch_topk_encoding_keeps_k_per_token_on_average():
    model = _model()
    model.threshold.fill_(-1.0)
    x = torch.randn(64, 2, 16)
    f = model.encode(x)
    assert (f != 0).sum().item() == 4 * 64
    # Which ones: the k * B largest saliences pre_j * w_j of the batch (brute force: a full sort), each
    # kept at its pre-activation (unscaled), not the largest pre-activations.
    with torch.no_grad():
        pre = torch.relu(torch.einsum("bld,ldm->bm", x * torch.tensor([0.5, 2.0])[None, :, None], model.W_enc)
                         + model.b_enc)
        salience = pre * (model.W_dec.norm(dim=-1) ** 2).sum(0)  # "paper": ||d_base||^2 + ||d_edited||^2
    cut = salience.flatten().sort(descending=True).values[4 * 64 - 1]
    torch.testing.assert_close(f, pre * (salience >= cut))
    assert not torch.equal(f != 0, pre >= pre.flatten().sort(descending=True).values[4 * 64 - 1])


def test_save_load_is_bit_identical(tmp_path):
    model = _model("sae")
    model.save_pretrained(tmp_path / "cc")
    loaded = BatchTopKCrossCoder.from_pretrained(tmp_path / "cc")
    x = torch.randn(50, 2, 16)
    assert torch.equal(model.encode(x), loaded.encode(x))
    assert torch.equal(model(x), loaded(x))
    assert loaded.cfg == model.cfg
    assert not list((tmp_path / "cc").glob("*.tmp"))


def test_the_state_dict_keeps_the_weights_in_their_public_layouts():
    """Encoder and decoder are stored latent-major (W_enc_by_latent, W_dec_by_latent: m x n x d); the state dict,
    which dictionary_learning and checkpoints read, has W_enc (n, d, m) and W_dec (n, m, d), contiguous, and
    loads back from them."""
    model = _model()
    state = model.state_dict()
    assert not any(name.endswith("_by_latent") for name in state)
    assert state["W_enc"].shape == (2, 16, 64) and state["W_dec"].shape == (2, 64, 16)
    assert state["W_enc"].is_contiguous() and state["W_dec"].is_contiguous()
    assert torch.equal(state["W_enc"], torch.einsum("mnd->ndm", model.W_enc_by_latent.detach()))
    assert torch.equal(state["W_dec"], torch.einsum("mnd->nmd", model.W_dec_by_latent.detach()))
    other = _model(seed=1)
    other.load_state_dict(state)
    x = torch.randn(20, 2, 16)
    assert torch.equal(other.encode(x), model.encode(x)) and torch.equal(other(x), model(x))
    with pytest.raises(RuntimeError, match=r"size mismatch for W_enc: .*\(2, 64, 16\).*\(2, 16, 64\)"):
        other.load_state_dict({**state, "W_enc": state["W_enc"].transpose(1, 2)})
    with pytest.raises(RuntimeError, match=r"size mismatch for W_dec: .*\(64, 2, 16\).*\(2, 64, 16\)"):
        other.load_state_dict({**state, "W_dec": state["W_dec"].transpose(0, 1)})
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"W_dec\""):
        other.load_state_dict({k: v for k, v in state.items() if k != "W_dec"})


def test_decode_is_the_decoder_sum_per_model():
    model = _model()
    f = torch.relu(torch.randn(7, 64))
    expected = torch.stack([f @ model.W_dec[layer] for layer in range(2)], dim=1) + model.b_dec
    torch.testing.assert_close(model.decode(f), model.denormalize(expected))


def test_load_refuses_missing_corrupt_and_foreign_files(tmp_path):
    model = _model()
    path = model.save_pretrained(tmp_path / "cc")
    with pytest.raises(CheckpointError, match="is not a directory"):
        BatchTopKCrossCoder.from_pretrained(tmp_path / "nowhere")

    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        BatchTopKCrossCoder.from_pretrained(path)

    model.save_pretrained(path)
    (path / "config.json").write_text('{"format": "mneme-cross')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        BatchTopKCrossCoder.from_pretrained(path)

    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKCrossCoder"}}))
    with pytest.raises(CheckpointError, match="another project"):
        BatchTopKCrossCoder.from_pretrained(path)

    other = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=16, dict_size=32, k=4))
    other.save_pretrained(path)
    (path / "model.safetensors").unlink()
    model.save_pretrained(tmp_path / "big")
    (tmp_path / "big" / "model.safetensors").rename(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        BatchTopKCrossCoder.from_pretrained(path)


def test_bad_inputs_and_configs_are_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"\(batch, 2, 16\)"):
        model.encode(torch.randn(4, 16))
    with pytest.raises(ConfigError, match="salience"):
        CrossCoderConfig(activation_dim=4, dict_size=8, k=2, salience="l1")
    with pytest.raises(ConfigError, match="did you mean 'dict_size'"):
        CrossCoderConfig.from_dict({"activation_dim": 4, "dict_sise": 8})
    with pytest.raises(ConfigError, match="d_model=32"):
        CrossCoderConfig(activation_dim=16).resolve(32)
    assert CrossCoderConfig(expansion_factor=8).resolve(32).dict_size == 256


@pytest.mark.parametrize("field,value,expected", [
    ("k", "four", r"config\.k = 'four' \(str\): expected an integer"),
    ("dict_size", 12.5, r"config\.dict_size = 12\.5 \(float\): expected an integer or null"),
    ("salience", 3, r"config\.salience = 3 \(int\): expected a string"),
    ("expansion_factor", True, r"config\.expansion_factor = True \(bool\): expected an integer"),
    ("metadata", [], r"config\.metadata = \[\] \(list\): expected a mapping"),
])
def test_a_wrongly_typed_config_json_field_is_a_checkpoint_error_naming_it(tmp_path, field, value, expected):
    """Issue 11 item 6: an edited / damaged config.json says which field is wrong, no TypeError."""
    path = _model().save_pretrained(tmp_path / "cc")
    meta = json.loads((path / "config.json").read_text())
    meta["config"][field] = value
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"{path / 'config.json'} holds an invalid crosscoder config: {expected}"):
        BatchTopKCrossCoder.from_pretrained(path)
