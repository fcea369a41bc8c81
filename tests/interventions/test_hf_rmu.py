"""RMU on tiny HF causal LMs: the measured objective, the parameters it touches, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mneme_plugin.errors import ConfigError, EmptyCorpusError, MnemeError
from mneme_plugin.interventions.hf_models import (
    INTERVENTION_CONFIG, load_causal_lm, load_training_log, save_intervention,
)
from mneme_plugin.interventions.hf_rmu import HFRMUConfig, control_vectors, rmu_activation_distances, rmu_unlearn_hf
from tests.helpers import tiny_rmu_config


def rmu_config(model_dir, rmu_corpora, **kw):
    return tiny_rmu_config(model_dir, rmu_corpora, **{"batch_size": 8, "max_num_batches": 36, "min_chars": 0, **kw})


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rmu_steers_forget_keeps_retain_and_trains_only_named_parameters(family, tiny_lm_dirs, rmu_corpora, tmp_path):
    _, _, forget, retain = rmu_corpora
    cfg = rmu_config(tiny_lm_dirs[family], rmu_corpora)
    result = rmu_unlearn_hf(cfg, progress=False)
    out = save_intervention(result, tmp_path / "unlearned")

    base, tok = load_causal_lm(str(tiny_lm_dirs[family]), "cpu")
    edited, _ = load_causal_lm(str(out), "cpu")
    control = result.extra["control_vectors"][0]
    # The control vector is the documented one: uniform [0, 1) direction of norm steering_coeff.
    assert torch.allclose(control, control_vectors(32, [5.0], cfg.seed)[0])
    assert control.min() >= 0 and control.norm().item() == pytest.approx(5.0, rel=1e-5)
    f_before, r_before = rmu_activation_distances(base, tok, base, forget, retain, cfg, control)
    f_after, r_after = rmu_activation_distances(edited, tok, base, forget, retain, cfg, control)
    assert r_before == 0.0
    assert f_after < 0.9 * f_before  # forget activations moved towards the control vector
    assert r_after < 0.25 * (f_before - f_after)  # retain activations moved far less

    before_w, after_w = weights(tiny_lm_dirs[family]), weights(out)
    changed = {k for k in before_w if not torch.equal(before_w[k], after_w[k])}
    assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in (0, 1, 2)}
    if family == "qwen2":
        assert any(k.endswith("q_proj.bias") for k in before_w)  # the family with attention biases

    saved = (out / INTERVENTION_CONFIG).read_text()
    assert HFRMUConfig.from_dict(__import__("yaml").safe_load(saved)["config"]) == cfg
    log = load_training_log(out)
    assert [r["step"] for r in log] == list(range(36)) and log[-1]["forget_loss"] < log[0]["forget_loss"]


def test_rmu_topics_alternate_and_custom_parameter_names(tiny_lm_dirs, rmu_corpora, tmp_path):
    forget_path, retain_path, _, _ = rmu_corpora
    cfg = rmu_config(tiny_lm_dirs["llama"], rmu_corpora, forget_corpora=[str(forget_path), str(retain_path)],
                     steering_coeff=[5.0, 2.0], alpha=[10.0, 1.0], max_num_batches=6,
                     param_names=["model.layers.1.self_attn.o_proj.weight"])
    result = rmu_unlearn_hf(cfg, progress=False)
    assert [r["topic"] for r in result.log] == [0, 1, 0, 1, 0, 1]
    assert result.extra["trained_parameters"] == ["model.layers.1.self_attn.o_proj.weight"]
    assert [round(c.norm().item(), 4) for c in result.extra["control_vectors"]] == [5.0, 2.0]


def test_rmu_bad_input_is_a_clear_error_and_writes_nothing(tiny_lm_dirs, rmu_corpora, tmp_path):
    with pytest.raises(ConfigError, match="No parameter named 'layers.9.mlp.down_proj.weight'"):
        rmu_unlearn_hf(rmu_config(tiny_lm_dirs["llama"], rmu_corpora, param_names=["layers.9.mlp.down_proj.weight"],
                                  layer_id=1), progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(EmptyCorpusError, match="Forget corpus"):
        rmu_unlearn_hf(rmu_config(tiny_lm_dirs["llama"], rmu_corpora, forget_corpora=[str(empty)]), progress=False)
    with pytest.raises(MnemeError, match="out of range"):
        rmu_unlearn_hf(rmu_config(tiny_lm_dirs["llama"], rmu_corpora, layer_id=3), progress=False)
    not_lm = tmp_path / "t5"
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=16, vocab_size=50).save_pretrained(not_lm)
    with pytest.raises(ConfigError, match="not a causal language model"):
        rmu_unlearn_hf(rmu_config(not_lm, rmu_corpora), progress=False)
    with pytest.raises(ConfigError, match="not a Hugging Face model"):
        rmu_unlearn_hf(rmu_config(tmp_path, rmu_corpora), progress=False)
    with pytest.raises(ConfigError, match="forget corpus"):
        rmu_unlearn_hf(HFRMUConfig(model=str(tiny_lm_dirs["llama"])), progress=False)
    assert HFRMUConfig.from_dict({}).model == ""  # usable as an empty run-config section
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "t5"]


def test_rmu_refuses_trained_parameters_past_the_steered_layer(tiny_lm_dirs, rmu_corpora, tmp_path):
    """The forward pass stops at the steered layer: a parameter after it gets no gradient. All of them past
    it raised torch's "element 0 of tensors does not require grad"; some of them trained the others and
    saved a config listing the untouched ones. Both are refused, layer_ids when the config is read."""
    with pytest.raises(ConfigError, match=r"layer_ids \[0, 2\] must be at or before layer_id 1"):
        rmu_config(tiny_lm_dirs["llama"], rmu_corpora, layer_ids=[0, 2], layer_id=1)
    with pytest.raises(ConfigError, match=r"steers the output of layer 1, so these trained parameters get no "
                                          r"gradient and would not change: lm_head.weight\. Train parameters"):
        rmu_unlearn_hf(rmu_config(tiny_lm_dirs["llama"], rmu_corpora, layer_id=1, param_names=["lm_head.weight"]),
                       progress=False)
    mixed = ["model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    with pytest.raises(ConfigError, match=r"would not change: model\.layers\.2\.mlp\.down_proj\.weight\. "):
        rmu_unlearn_hf(rmu_config(tiny_lm_dirs["llama"], rmu_corpora, layer_id=1, param_names=mixed,
                                  max_num_batches=2, checkpoint_every=0), progress=False, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_edited_model_is_fsynced_before_it_replaces_its_checkpoints(tiny_lm_dirs, rmu_corpora, tmp_path,
                                                                       monkeypatch):
    """Renaming the finished folder into place removes the (fsynced) checkpoints that could redo it: its
    own files are fsynced first, so a power cut cannot leave a complete-looking folder of truncated weights."""
    import os

    result = rmu_unlearn_hf(rmu_config(tiny_lm_dirs["llama"], rmu_corpora, max_num_batches=2), progress=False)
    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = save_intervention(result, tmp_path / "unlearned")
    names = {os.path.basename(path) for path in synced}
    assert {"model.safetensors", "config.json", INTERVENTION_CONFIG}.issubset(names), sorted(names)
    assert weights(out)  # the folder is the model, complete
