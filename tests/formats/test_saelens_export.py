"""Export to SAE-Lens: stock ``sae_lens.SAE`` loads it and encodes / decodes exactly like the crosscoder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sae_lens  # a core dependency: never skipped
import torch

from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig
from mneme_plugin.errors import CheckpointError, ConfigError
from mneme_plugin.formats import export_saelens, load_crosscoder
from mneme_plugin.formats.saelens import MODEL_ORDER
from tests.formats.test_import_published import _median_threshold
from tests.helpers import (
    hub_cache_repo,
    kissane_state_dict,
    sof_state_dict,
    write_kissane_crosscoder,
    write_sof_crosscoder,
)

D, M, K = 16, 48, 4


def _ours(salience="paper"):
    torch.manual_seed(0)
    cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=D, dict_size=M, k=K, salience=salience, metadata={
        "base_model": "org/base", "edited_model": "org/edited", "hook_name": "blocks.1.hook_resid_post",
        "context_length": 64}))
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(2, M, 1) * 3)
        cc.W_dec[:, 5] = 0.0  # a dead latent: threshold +inf
        cc.b_enc.normal_(0, 0.05)
        cc.b_dec.normal_(0, 0.1)
        cc.threshold.fill_(0.05)
    cc.set_activation_scale([0.5, 2.0])
    return cc


def _x(n=128):
    return 2.0 * torch.randn(n, 2, D, generator=torch.Generator().manual_seed(3)) + 0.3


def _variants(tmp_path):
    x = _x()
    yield "paper", _ours("paper")
    yield "crosscoder", _ours("crosscoder")
    for code_norm in ("SAE", "DECOUPLED"):
        sd = sof_state_dict(D, M, K, code_norm, seed=4)
        sd["threshold"] = torch.tensor(_median_threshold(sd, code_norm, x), dtype=torch.float32)
        yield f"sof-{code_norm}", load_crosscoder(
            write_sof_crosscoder(tmp_path / code_norm, sd, "hub", code_normalization=code_norm, k=K))
    yield "kissane", load_crosscoder(write_kissane_crosscoder(tmp_path / "k", kissane_state_dict(D, M)),
                                     scale_factors=[0.8, 1.3])


def _check_concat(sae, cc, x):
    B = x.shape[0]
    x_cat = x.reshape(B, 2 * D)
    feats = sae.encode(x_cat)
    if cc.cfg.salience == "decoupled":
        per_model = cc.encode_per_model(x)
        torch.testing.assert_close(feats, per_model.reshape(B, 2 * M), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats.reshape(B, 2, M).amax(1), cc.encode(x), rtol=1e-5, atol=1e-5)
    else:
        f = cc.encode(x)
        torch.testing.assert_close(feats, f, rtol=1e-5, atol=1e-5)
        assert (f > 0).any()
        torch.testing.assert_close(sae.decode(feats), cc.decode(f).reshape(B, 2 * D), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae(x_cat), cc(x).reshape(B, 2 * D), rtol=1e-4, atol=1e-4)


def test_export_loads_in_stock_saelens_and_matches(tmp_path):
    x = _x()
    for name, cc in _variants(tmp_path):
        written = export_saelens(cc, tmp_path / "export" / name, views=True)
        sae = sae_lens.SAE.load_from_disk(str(written["concat"]))
        assert type(sae).__name__ == "JumpReLUSAE"
        assert sae.cfg.d_in == 2 * D and not sae.cfg.apply_b_dec_to_input
        assert int(sae.cfg.metadata.sae_lens_version.split(".")[0]) >= 6
        _check_concat(sae, cc, x)
        # Per-model views: d_in = d, marked partial, decoders are the matching half: a view decodes the
        # concat SAE's codes into that model's half of the concat reconstruction.
        full = sae_lens.SAE.load_from_disk(str(written["concat"]))
        feats = full.encode(x.reshape(x.shape[0], 2 * D))
        for layer, view in enumerate(("base", "edited")):
            v = sae_lens.SAE.load_from_disk(str(written[view]))
            assert v.cfg.d_in == D and v.cfg.metadata.partial and v.cfg.metadata.view == view
            cols = slice(layer * D, (layer + 1) * D)
            if cc.cfg.salience != "decoupled":
                torch.testing.assert_close(v.W_dec, full.W_dec[:, cols])
                own = feats
            else:  # the view keeps the latents gated for its model
                own = feats[:, layer * M:(layer + 1) * M]
            torch.testing.assert_close(v.decode(own), full.decode(feats)[:, cols], rtol=1e-5, atol=1e-5)
            # What "partial" means (module docstring): the crosscoder's codes with the other model's input
            # at its mean (normalised input 0). The folded bias held the other model's mean term as well.
            other = 1 - layer
            at_mean = x.clone()
            at_mean[:, other] = cc.activation_mean[other] if cc.cfg.normalization == "mean_scale" else 0.0
            expected = (cc.encode_per_model(at_mean)[:, layer] if cc.cfg.salience == "decoupled"
                        else cc.encode(at_mean))
            torch.testing.assert_close(v.encode(x[:, layer]), expected, rtol=1e-4, atol=1e-4)
        # Our own reader gets the exported crosscoder back (jumprelu, raw space), same codes.
        if cc.cfg.salience != "decoupled":
            back = load_crosscoder(written["concat"])
            assert back.cfg.sparsity == "jumprelu"
            torch.testing.assert_close(back.encode(x), cc.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(back(x), cc(x), rtol=1e-4, atol=1e-4)
            # ... in its normalised space: the same scale factors and decoder, so the same attribution.
            torch.testing.assert_close(back.activation_scale, cc.activation_scale)
            torch.testing.assert_close(back.W_dec, cc.W_dec.to(back.W_dec.dtype), rtol=1e-5, atol=1e-6)
            assert back.cfg.normalization == cc.cfg.normalization


def test_metadata_and_folder_per_hook_layout(tmp_path):
    cc = _ours()
    written = export_saelens(cc, tmp_path / "repo", views=True)
    hook = "blocks.1.hook_resid_post"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [hook, f"{hook}__base", f"{hook}__edited"]
    for folder in written.values():
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((written["concat"] / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 2 * D and cfg["d_sae"] == M
    assert meta["model_names"] == {"base": "org/base", "edited": "org/edited"}
    assert meta["hook_name"] == hook and meta["model_order"] == ["base", "edited"] and meta["salience"] == "paper"
    assert "concat(base, edited)" in meta["layout"] and meta["partial"] is False
    assert json.loads((written["base"] / "cfg.json").read_text())["metadata"]["partial"] is True


def test_from_pretrained_reads_the_layout_from_a_hub_repo(tmp_path, hub_cache):
    """SAE.from_pretrained("org/repo", "<folder>") on the export pushed as a repo: stock SAE-Lens and the real
    huggingface_hub client, served offline from a cache laid out as a download leaves it."""
    cc = _ours()
    written = export_saelens(cc, tmp_path / "repo", views=True)
    hub_cache_repo(hub_cache, "someone/my-crosscoder", tmp_path / "repo")
    sae = sae_lens.SAE.from_pretrained("someone/my-crosscoder", written["concat"].name)
    _check_concat(sae, cc, _x())
    edited = sae_lens.SAE.from_pretrained("someone/my-crosscoder", written["edited"].name)
    assert edited.cfg.d_in == D and edited.cfg.metadata.view == "edited"


def test_export_does_not_import_sae_lens(tmp_path):
    code = (
        "import sys, torch\n"
        "from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig\n"
        "from mneme_plugin.formats import export_saelens\n"
        "cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=4, dict_size=8, k=2))\n"
        "cc.threshold.fill_(0.1)\n"
        f"export_saelens(cc, {str(tmp_path / 'e')!r})\n"
        "assert 'sae_lens' not in sys.modules, 'sae_lens was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_export_refusals(tmp_path):
    cc = _ours()
    cc.threshold.fill_(-1.0)
    with pytest.raises(ConfigError, match="no inference threshold"):
        export_saelens(cc, tmp_path / "e")
    written = export_saelens(_ours(), tmp_path / "f", views=True)
    with pytest.raises(CheckpointError, match="per-model"):
        load_crosscoder(written["base"])
    cfg = json.loads((written["concat"] / "cfg.json").read_text())
    del cfg["metadata"]["mneme"]
    (written["concat"] / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a crosscoder exported by mneme"):
        load_crosscoder(written["concat"])


def test_a_forced_export_without_views_leaves_no_views_of_the_earlier_crosscoder(tmp_path):
    """Exporting another crosscoder over an export with views (force, no views) rewrote the concat SAE but left the
    old per-model views beside it: SAE-Lens then loaded `<hook>__base` with the earlier crosscoder's weights."""
    from mneme_plugin.files import OutputExistsError

    first, second = _ours(), _ours("crosscoder")
    with torch.no_grad():
        second.W_dec.mul_(1.5)
    out = tmp_path / "repo"
    written = export_saelens(first, out, views=True)
    hook = written["concat"].name
    (out / "README.md").write_text("a repo file of the user's")
    with pytest.raises(OutputExistsError):
        export_saelens(second, out)
    written = export_saelens(second, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", hook]
    x = _x()
    _check_concat(sae_lens.SAE.load_from_disk(str(written["concat"])), second, x)
    # With views, each one is the new crosscoder's half.
    written = export_saelens(second, out, views=True, force=True)
    full = sae_lens.SAE.load_from_disk(str(written["concat"]))
    for layer, view in enumerate(MODEL_ORDER):
        v = sae_lens.SAE.load_from_disk(str(written[view]))
        torch.testing.assert_close(v.W_dec, full.W_dec[:, layer * D:(layer + 1) * D])
    # A folder that only looks like a view (not a mneme export) is left alone.
    export_saelens(first, out, force=True)
    foreign = out / f"{hook}__edited"
    foreign.mkdir()
    (foreign / "cfg.json").write_text(json.dumps({"architecture": "standard", "metadata": {"partial": True}}))
    export_saelens(second, out, force=True)
    assert (foreign / "cfg.json").is_file()
