"""Unknown, corrupt and foreign files give a CheckpointError naming the file; hub ids download."""


import pytest
import torch

from mneme_plugin.errors import CheckpointError
from mneme_plugin.formats import load_crosscoder
from tests.helpers import (
    hub_cache_repo,
    kissane_state_dict,
    sof_state_dict,
    write_kissane_crosscoder,
    write_sof_crosscoder,
)


def test_unknown_folder_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is not a crosscoder.*cc_weights.pt"):
        load_crosscoder(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_crosscoder(tmp_path / "nowhere")


def test_corrupt_weight_files_name_the_file(tmp_path):
    folder = write_sof_crosscoder(tmp_path / "hub", sof_state_dict(), "hub")
    (folder / "model.safetensors").write_bytes(b"\x00not safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable tensor file"):
        load_crosscoder(folder)

    folder = write_sof_crosscoder(tmp_path / "local", sof_state_dict(), "local")
    (folder / "model_final.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model_final.pt"):
        load_crosscoder(folder)

    folder = write_kissane_crosscoder(tmp_path / "k", kissane_state_dict())
    (folder / "cfg.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"cfg.json is corrupt: not valid JSON"):
        load_crosscoder(folder)


def test_foreign_or_wrong_shaped_tensors(tmp_path):
    sd = sof_state_dict()
    del sd["decoder.bias"]
    folder = write_sof_crosscoder(tmp_path / "a", sd, "hub")
    with pytest.raises(CheckpointError, match=r"model.safetensors lacks tensor 'decoder.bias'"):
        load_crosscoder(folder)

    sd = sof_state_dict()
    sd["encoder.weight"] = torch.randn(3, 16, 48)
    with pytest.raises(CheckpointError, match="exactly 2"):
        load_crosscoder(write_sof_crosscoder(tmp_path / "b", sd, "local"))

    sd = kissane_state_dict()
    sd["W_dec"] = sd["W_dec"].permute(1, 0, 2).contiguous()  # (2, m, d): not Kissane's layout
    with pytest.raises(CheckpointError, match=r"cc_weights.pt: tensor 'W_dec' has shape"):
        load_crosscoder(write_kissane_crosscoder(tmp_path / "c", sd))

    sd = sof_state_dict()
    sd["code_normalization_id"] = torch.tensor(9)
    with pytest.raises(CheckpointError, match="code_normalization_id 9"):
        load_crosscoder(write_sof_crosscoder(tmp_path / "d", sd, "hub"))

    folder = write_sof_crosscoder(tmp_path / "e", sof_state_dict(), "hub", dict_class="MatryoshkaCrossCoder")
    with pytest.raises(CheckpointError, match="dict_class 'MatryoshkaCrossCoder'"):
        load_crosscoder(folder)

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt"):
        load_crosscoder(tmp_path / "list.pt")


def test_several_crosscoders_need_a_subfolder(tmp_path):
    write_kissane_crosscoder(tmp_path / "repo", kissane_state_dict(), hook_point="blocks.3.hook_resid_pre")
    write_kissane_crosscoder(tmp_path / "repo", kissane_state_dict(), hook_point="blocks.4.hook_resid_pre")
    # The message named --subfolder, which `mneme attribute` and `collect` do not have: it names a folder to give.
    with pytest.raises(CheckpointError, match="several crosscoders .*; give one of them "
                                              rf"\({tmp_path / 'repo' / 'blocks.4.hook_resid_pre'}, say\)"):
        load_crosscoder(tmp_path / "repo")
    cc = load_crosscoder(tmp_path / "repo", subfolder="blocks.4.hook_resid_pre")
    assert cc.cfg.metadata["hook_name"] == "blocks.4.hook_resid_pre"


def test_hub_ids_download_through_huggingface_hub(tmp_path, hub_cache, monkeypatch):
    """A hub id 'org/repo/<subfolder>' goes through huggingface_hub's snapshot_download (the real one, served
    offline from a cache laid out as a download leaves it), asks for that subfolder only and loads it."""
    import huggingface_hub

    wanted, other = kissane_state_dict(seed=0), kissane_state_dict(seed=1)
    write_kissane_crosscoder(tmp_path / "repo", wanted, hook_point="blocks.14.hook_resid_pre")
    write_kissane_crosscoder(tmp_path / "repo", other, hook_point="blocks.4.hook_resid_pre")
    hub_cache_repo(hub_cache, "ckkissane/crosscoder-gemma-2-2b-model-diff", tmp_path / "repo")
    calls = []
    real = huggingface_hub.snapshot_download

    def recording_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))  # recorded, then the real client does the work
        return real(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_snapshot_download)
    cc = load_crosscoder("ckkissane/crosscoder-gemma-2-2b-model-diff/blocks.14.hook_resid_pre", scale_factors=[1, 1])
    assert calls == [("ckkissane/crosscoder-gemma-2-2b-model-diff", None, ["blocks.14.hook_resid_pre/*"])]
    assert cc.cfg.sparsity == "relu"
    assert torch.equal(cc.W_enc.detach(), wanted["W_enc"]) and not torch.equal(cc.W_enc.detach(), other["W_enc"])
    assert cc.cfg.metadata["hook_name"] == "blocks.14.hook_resid_pre"


def test_offline_hub_id_is_a_clear_error(hub_cache):
    with pytest.raises(CheckpointError, match="downloading the hub repo 'nobody/nothing-here' failed"):
        load_crosscoder("nobody/nothing-here")


def test_scale_factors_only_for_kissane(tmp_path):
    folder = write_sof_crosscoder(tmp_path / "hub", sof_state_dict(), "hub")
    with pytest.raises(CheckpointError, match="only for Kissane"):
        load_crosscoder(folder, scale_factors=[1.0, 1.0])


def _edited_saelens_export(tmp_path, edit):
    import json

    from mneme_plugin.formats import export_saelens

    cc = load_crosscoder(write_sof_crosscoder(tmp_path / "src", sof_state_dict(seed=2, threshold=0.05), "hub"))
    folder = export_saelens(cc, tmp_path / "exports", folder="f")["concat"]
    cfg = json.loads((folder / "cfg.json").read_text())
    edit(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.pop("d_in"), r"cfg\.json lacks 'd_in'"),
    (lambda c: c.update(d_sae="many"), r"cfg\.json: d_sae = 'many' is not a whole number"),
    (lambda c: c["metadata"]["mneme"]["crosscoder_config"].update(k=None), r"cfg\.json: k = None is not a whole number"),
    (lambda c: c["metadata"]["mneme"].update(crosscoder_config=[1]), r"metadata\.mneme\.crosscoder_config is a list"),
    (lambda c: c["metadata"]["mneme"]["normalization"].pop("activation_scale"),
     r"normalization lacks \['activation_scale'\]"),
    (lambda c: c["metadata"]["mneme"]["normalization"].update(activation_scale=[1.0]),
     r"cfg\.json: metadata\.mneme\.normalization does not fit"),
    (lambda c: c["metadata"]["mneme"]["normalization"]["activation_mean"][1].__setitem__(0, float("nan")),
     r"cfg\.json: metadata\.mneme\.normalization: tensor 'activation_mean' holds 1 non-finite value"),
    (lambda c: c["metadata"]["mneme"]["crosscoder_config"].update(salience="bogus"),
     r"cfg\.json describes no valid crosscoder: salience must be one of"),
])
def test_damaged_saelens_export_config_names_the_file(tmp_path, edit, expected):
    folder = _edited_saelens_export(tmp_path, edit)
    with pytest.raises(CheckpointError, match=expected):
        load_crosscoder(folder)


def test_kissane_cfg_with_non_numeric_sizes_names_the_file(tmp_path):
    import json

    folder = write_kissane_crosscoder(tmp_path / "k", kissane_state_dict())
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_in"] = "sixteen"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"cfg\.json: d_in = 'sixteen' is not a whole number"):
        load_crosscoder(folder, scale_factors=[1.0, 1.0])


@pytest.mark.parametrize("factors", [[-1.0, 0.0], [float("nan"), 1.0], [1.0, 1.0, 1.0]])
def test_kissane_invalid_scale_factors_are_a_config_error(tmp_path, factors):
    from mneme_plugin.errors import ConfigError

    folder = write_kissane_crosscoder(tmp_path / "k", kissane_state_dict())
    with pytest.raises(ConfigError, match=r"scale_factors for .*hook_resid_pre: activation_scale must be 2 positive"):
        load_crosscoder(folder, scale_factors=factors)


def _sof_with_configs(tmp_path, sd, init=None, trainer=None):
    import json

    folder = write_sof_crosscoder(tmp_path / "s", sd, "hub")
    for name, edit in (("config.json", init), ("trainer_config.json", trainer)):
        if edit is not None:
            cfg = json.loads((folder / name).read_text())
            edit(cfg)
            (folder / name).write_text(json.dumps(cfg))
    return folder


def _without(*keys):
    sd = sof_state_dict()
    for key in keys:
        del sd[key]
    return sd


@pytest.mark.parametrize("sd, init, trainer, expected", [
    ({**sof_state_dict(), "k": torch.tensor([4, 4])}, None, None, r"model\.safetensors: tensor 'k' has shape \(2,\), expected a scalar"),
    ({**sof_state_dict(), "code_normalization_id": torch.tensor([1, 1])}, None, None,
     r"tensor 'code_normalization_id' has shape \(2,\), expected a scalar"),
    (_without("k"), lambda c: c.update(k="four"), None, r"config\.json: k = 'four' is not a whole number"),
    (sof_state_dict(), None, lambda c: c.update(trainer="x"), r"trainer_config\.json: \"trainer\" is a str"),
    (sof_state_dict(code_normalization="MIXED"), lambda c: c.update(code_normalization_alpha_sae="x"), None,
     r"config\.json: code_normalization_alpha_sae = 'x' is not a number"),
    ({**sof_state_dict(), "k": torch.tensor(1000)}, None, None,
     r"model\.safetensors describes no valid crosscoder: k must be at most dict_size=48"),
])
def test_damaged_science_of_finetuning_configs_name_the_file(tmp_path, sd, init, trainer, expected):
    with pytest.raises(CheckpointError, match=expected):
        load_crosscoder(_sof_with_configs(tmp_path, sd, init, trainer))


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m["config"].pop("activation_dim"), r"config\.json lacks config\.activation_dim or config\.dict_size"),
    (lambda m: m.update(architecture=["batchtopk"]), r"config\.json: architecture is \['batchtopk'\], expected a name"),
])
def test_damaged_mneme_crosscoder_config_names_the_file(tmp_path, edit, expected):
    import json

    from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig

    path = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=8, dict_size=16, k=2)).save_pretrained(tmp_path / "cc")
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=expected):
        load_crosscoder(path)


# ------------------------------------------------------------------ weights that are not finite floats


def _mneme_crosscoder(folder):
    from mneme_plugin.crosscoder import BatchTopKCrossCoder, CrossCoderConfig

    cc = BatchTopKCrossCoder(CrossCoderConfig(activation_dim=8, dict_size=16, k=2))
    cc.reset_parameters(torch.Generator().manual_seed(0))
    return cc.save_pretrained(folder)


def _rewrite_safetensors(path, name, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors[name] = edit(tensors[name])
    save_file(tensors, str(path))


def _nan(t):
    t = t.clone().float()
    t.view(-1)[-1] = float("nan")
    return t


def _inf(t):
    t = t.clone().float()
    t.view(-1)[0] = float("-inf")
    return t


def _integer(t):
    return (t * 100).to(torch.int64)


def _mneme_with(tmp_path, name, edit):
    folder = _mneme_crosscoder(tmp_path / "cc")
    _rewrite_safetensors(folder / "model.safetensors", name, edit)
    return folder


def _saelens_with(tmp_path, name, edit):
    from mneme_plugin.formats import export_saelens

    cc = load_crosscoder(write_sof_crosscoder(tmp_path / "src", sof_state_dict(seed=2, threshold=0.05), "hub"))
    folder = export_saelens(cc, tmp_path / "exports", folder="f")["concat"]
    _rewrite_safetensors(folder / "sae_weights.safetensors", name, edit)
    return folder


def _kissane_with(tmp_path, name, edit):
    sd = kissane_state_dict()
    sd[name] = edit(sd[name])
    return write_kissane_crosscoder(tmp_path / "k", sd)


def _sof_with(tmp_path, name, edit, layout="hub"):
    sd = sof_state_dict()
    sd[name] = edit(sd[name])
    return write_sof_crosscoder(tmp_path / "s", sd, layout)


@pytest.mark.parametrize("build, name, file", [
    (_mneme_with, "W_enc", "model.safetensors"),
    (_mneme_with, "b_dec", "model.safetensors"),
    (_mneme_with, "activation_scale", "model.safetensors"),
    (_saelens_with, "W_dec", "sae_weights.safetensors"),
    (_saelens_with, "threshold", "sae_weights.safetensors"),
    (_kissane_with, "b_enc", "cc_weights.pt"),
    (_sof_with, "encoder.weight", "model.safetensors"),
    (_sof_with, "decoder.bias", "model.safetensors"),
    (_sof_with, "activation_mean", "model.safetensors"),
    (_sof_with, "threshold", "model.safetensors"),
])
@pytest.mark.parametrize("edit, problem", [
    (_nan, r"holds 1 non-finite value \(NaN or -?inf\)"),
    (_inf, r"holds 1 non-finite value"),
    (_integer, r"has dtype torch\.int64, expected floating-point weights"),
])
def test_weights_that_are_not_finite_floats_are_refused_naming_tensor_and_file(tmp_path, build, name, file, edit,
                                                                                problem):
    folder = build(tmp_path, name, edit)
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '{name}' " + problem):
        load_crosscoder(folder, **({"scale_factors": [1.0, 1.0]} if build is _kissane_with else {}))


def test_an_infinite_threshold_of_a_dead_latent_still_loads(tmp_path):
    """SAE-Lens exports give a latent whose decoder is zero the threshold +inf (it never fires): not damage."""
    from mneme_plugin.formats import export_saelens

    sd = sof_state_dict(seed=2, threshold=0.05)
    sd["decoder.weight"][:, 5] = 0.0
    cc = load_crosscoder(write_sof_crosscoder(tmp_path / "src", sd, "hub"))
    folder = export_saelens(cc, tmp_path / "exports", folder="f")["concat"]
    imported = load_crosscoder(folder)
    assert torch.isinf(imported.latent_threshold[5]) and torch.isfinite(imported.latent_threshold[:5]).all()
    again = load_crosscoder(imported.save_pretrained(tmp_path / "mneme"))
    assert torch.equal(again.latent_threshold, imported.latent_threshold)


# --------------------------------------------- a science-of-finetuning normaliser recorded in part


def _half_normaliser(recorded, other):
    """A state dict whose normaliser records ``recorded`` but leaves the other tensor ``other``."""
    sd = sof_state_dict()
    gone = "activation_std" if recorded == "activation_mean" else "activation_mean"
    if other == "missing":
        del sd[gone]
    else:
        sd[gone] = torch.full_like(sd[gone], float("nan"))
    return sd


@pytest.mark.parametrize("recorded", ["activation_mean", "activation_std"])
@pytest.mark.parametrize("other", ["missing", "NaN"])
def test_a_science_of_finetuning_normaliser_recorded_in_part_is_refused(tmp_path, recorded, other):
    """Their code normalises with mean and std together or not at all (``NormalizableMixin``: both NaN
    means no normaliser, and its loader refuses a file with some of the normaliser's tensors only), so a
    mean without a std cannot be read either way: it was edited or damaged. (Before: silently no normaliser.)"""
    gone = "activation_std" if recorded == "activation_mean" else "activation_mean"
    state = "missing" if other == "missing" else "NaN"
    folder = write_sof_crosscoder(tmp_path / "s", _half_normaliser(recorded, other), "hub")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors records {recorded} but {gone} is {state}"
                                              r".*restore the file"):
        load_crosscoder(folder)


@pytest.mark.parametrize("edit", ["both NaN", "both missing"])
def test_a_science_of_finetuning_crosscoder_without_a_normaliser_still_loads(tmp_path, edit):
    sd = sof_state_dict(normalizer=False)
    if edit == "both missing":  # checkpoints older than the normaliser
        del sd["activation_mean"], sd["activation_std"], sd["activation_global_scale"]
    assert load_crosscoder(write_sof_crosscoder(tmp_path / "s", sd, "hub")).cfg.normalization == "scale"


def test_malformed_science_of_finetuning_scalars_are_clear_errors(tmp_path):
    """A non-number target_rms in config.json (read when the file has no target_rms / global scale tensor) raised
    a raw TypeError / ValueError, and so did a NaN k or code_normalization_id tensor."""
    import json

    for value in ("abc", [1], {"a": 1}):
        sd = sof_state_dict()
        del sd["activation_global_scale"], sd["target_rms"]
        folder = write_sof_crosscoder(tmp_path / f"rms-{type(value).__name__}", sd, "hub")
        init = json.loads((folder / "config.json").read_text())
        init["target_rms"] = value
        (folder / "config.json").write_text(json.dumps(init))
        with pytest.raises(CheckpointError, match=r"config.json: target_rms = .* is not a number"):
            load_crosscoder(folder)
    for name, value in (("k", float("nan")), ("k", 2.5), ("code_normalization_id", float("nan"))):
        sd = sof_state_dict()
        sd[name] = torch.tensor(value)
        folder = write_sof_crosscoder(tmp_path / f"{name}-{value}", sd, "hub")
        with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' holds .*, not a whole number"):
            load_crosscoder(folder)
    # A whole k stored as a float, and an older checkpoint's numeric target_rms, still load as before.
    sd = sof_state_dict()
    sd["k"] = torch.tensor(4.0)
    del sd["activation_global_scale"], sd["target_rms"]
    folder = write_sof_crosscoder(tmp_path / "ok", sd, "hub")
    init = json.loads((folder / "config.json").read_text())
    init["target_rms"] = 2.0
    (folder / "config.json").write_text(json.dumps(init))
    cc = load_crosscoder(folder)
    assert cc.cfg.k == 4
    expected = 2.0 / torch.sqrt((sd["activation_std"].double() ** 2).sum(-1) + 1e-8)
    torch.testing.assert_close(cc.activation_scale, expected.float())
