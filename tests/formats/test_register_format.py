"""A format registered from outside (here: a toy one) is read by load_crosscoder and the stages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mneme_plugin import attribution
from mneme_plugin.crosscoder import CrossCoderConfig, ReLUCrossCoder
from mneme_plugin.errors import CheckpointError
from mneme_plugin.formats import FORMAT_REGISTRY, detect_format, import_crosscoder, load_crosscoder, register_format

D, M = 16, 40


def write_toy(folder, seed=0):
    """The toy format: toy.json {"d", "m"} + toy.safetensors, enc (2d, m) over concat(base, edited), dec (m, 2d)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {"enc": torch.randn(2 * D, M, generator=gen) / D**0.5, "enc_bias": 0.1 * torch.randn(M, generator=gen),
               "dec": 0.2 * torch.randn(M, 2 * D, generator=gen), "dec_bias": 0.1 * torch.randn(2 * D, generator=gen)}
    save_file(tensors, str(folder / "toy.safetensors"))
    (folder / "toy.json").write_text(json.dumps({"d": D, "m": M}))
    return folder, tensors


def load_toy(path, scale_factors=None):
    cfg = json.loads((path / "toy.json").read_text())
    t = load_file(str(path / "toy.safetensors"))
    d, m = cfg["d"], cfg["m"]
    cc = ReLUCrossCoder(CrossCoderConfig(activation_dim=d, dict_size=m, k=min(100, m), sparsity="relu"))
    with torch.no_grad():
        cc.W_enc.copy_(t["enc"].reshape(2, d, m))
        cc.b_enc.copy_(t["enc_bias"])
        cc.W_dec.copy_(t["dec"].reshape(m, 2, d).permute(1, 0, 2))
        cc.b_dec.copy_(t["dec_bias"].reshape(2, d))
        if scale_factors is not None:
            cc.set_activation_scale(scale_factors)
    return cc


@pytest.fixture
def toy_format():
    fmt = register_format("toy", lambda p: (p / "toy.json").is_file(), load_toy, options=("scale_factors",),
                          expected="toy.json + toy.safetensors (toy)", title="toy")
    yield fmt
    del FORMAT_REGISTRY["toy"]


def test_a_registered_format_is_loaded_without_editing_load_py(tmp_path, toy_format):
    folder, t = write_toy(tmp_path / "repo" / "hook")
    x = torch.randn(300, 2, D, generator=torch.Generator().manual_seed(1))
    assert detect_format(folder) == "toy"
    cc = load_crosscoder(tmp_path / "repo")  # the one crosscoder folder inside is found
    # Its codes and reconstructions are the toy formula's.
    pre = torch.relu(x.reshape(-1, 2 * D) @ t["enc"] + t["enc_bias"])
    torch.testing.assert_close(cc.encode(x), pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc(x).reshape(-1, 2 * D), pre @ t["dec"] + t["dec_bias"], rtol=1e-4, atol=1e-4)
    # Options reach the loader that declares them.
    scaled = load_crosscoder(folder, scale_factors=[2.0, 0.5])
    torch.testing.assert_close(scaled.encode(x), torch.relu((x * torch.tensor([2.0, 0.5])[None, :, None]).reshape(-1, 2 * D)
                                                             @ t["enc"] + t["enc_bias"]), rtol=1e-5, atol=1e-5)
    # Import into our format, and attribution by path, as for the built-in formats.
    out = import_crosscoder(folder, tmp_path / "ours")
    assert torch.equal(load_crosscoder(out).encode(x), cc.encode(x))
    table = attribution.attribute(folder, x, {"batch_size": 100, "device": "cpu"}, progress=False).table
    assert len(table) == M and (table["fire_count"] > 0).any()


def test_registered_formats_appear_in_errors_and_refuse_foreign_options(tmp_path, toy_format):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is not a crosscoder.*toy.json \+ toy.safetensors"):
        load_crosscoder(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="Unknown crosscoder format 'nope'.*'toy'"):
        load_crosscoder(tmp_path / "empty", format="nope")
    with pytest.raises(ValueError, match="already registered"):
        register_format("toy", lambda p: False, load_toy)


def test_a_registered_format_reads_weights_files_the_built_in_detectors_do_not(tmp_path):
    """A torch file holding more than a flat state dict ({"state_dict": ..., "cfg": ...}, a common layout) made the
    Kissane detector raise "does not hold a mapping of names to tensors", so a format registered for such files
    was never asked: detectors must not raise on foreign files."""
    from tests.helpers import kissane_state_dict

    sd = kissane_state_dict(D, M)
    torch.save({"state_dict": sd, "cfg": {"d_in": D}}, tmp_path / "nested.pt")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not safetensors")

    def load_nested(path):
        data = torch.load(path, weights_only=True)
        cc = ReLUCrossCoder(CrossCoderConfig(activation_dim=D, dict_size=M, k=min(100, M), sparsity="relu"))
        with torch.no_grad():
            cc.W_enc.copy_(data["state_dict"]["W_enc"])
            cc.b_enc.copy_(data["state_dict"]["b_enc"])
            cc.W_dec.copy_(data["state_dict"]["W_dec"].permute(1, 0, 2))
            cc.b_dec.copy_(data["state_dict"]["b_dec"])
        return cc

    register_format("nested-pt", lambda p: p.is_file() and p.name == "nested.pt", load_nested)
    try:
        assert detect_format(tmp_path / "nested.pt") == "nested-pt"
        assert detect_format(corrupt) is None
        cc = load_crosscoder(tmp_path / "nested.pt")
        x = torch.randn(50, 2, D, generator=torch.Generator().manual_seed(2))
        pre = torch.relu(torch.einsum("bld,ldm->bm", x, sd["W_enc"]) + sd["b_enc"])
        torch.testing.assert_close(cc.encode(x), pre, rtol=1e-5, atol=1e-5)
    finally:
        del FORMAT_REGISTRY["nested-pt"]
    # Unregistered, the same files are still refused with what is wrong with them.
    with pytest.raises(CheckpointError, match="nested.pt does not hold a mapping of names to tensors"):
        load_crosscoder(tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match="corrupt.safetensors is not a readable tensor file"):
        load_crosscoder(corrupt)
