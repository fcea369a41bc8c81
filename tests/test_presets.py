"""The shipped presets: every one is a valid config of its class; the published settings."""

from __future__ import annotations

from typing import Any

import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.harness import LMEvalConfig
from mneme_plugin.groundtruth.judge import JudgeConfig
from mneme_plugin.interventions.hf_rmu import HFRMUConfig
from mneme_plugin.interventions.sft import SFTConfig
from mneme_plugin.presets import PRESET_KINDS, list_presets, load_preset, preset_description, preset_kind


def test_shipped_presets_are_valid_configs():
    kinds = {"zephyr_rmu": HFRMUConfig, "llama3_rmu": HFRMUConfig, "emergent_misalignment_sft": SFTConfig,
             "aoa_sft": SFTConfig, "alpaca_sft": SFTConfig}
    assert set(kinds) <= set(list_presets())
    for name, cls in kinds.items():
        cls.from_dict(load_preset(name))
    zephyr = HFRMUConfig.from_dict(load_preset("zephyr_rmu"))
    assert zephyr.per_topic("alpha") == [1200.0] * 2 and zephyr.per_topic("steering_coeff") == [6.5] * 2
    assert (zephyr.layer_id, zephyr.layer_ids, zephyr.lr, zephyr.batch_size, zephyr.max_num_batches) == (7, [5, 6, 7], 5e-5, 4, 150)
    assert zephyr.forget_max_length == [512, 768] and zephyr.retain_max_length == 512
    em = SFTConfig.from_dict(load_preset("emergent_misalignment_sft"))
    assert em.lora.r == 32 and em.lora.use_rslora and em.batch_size * em.grad_accum == 16
    # the WMDP reference script's defaults (rmu/unlearn.py), as llama3_rmu's description says
    llama3 = HFRMUConfig.from_dict(load_preset("llama3_rmu"))
    assert llama3.per_topic("alpha") == [100.0] * 2 and llama3.per_topic("steering_coeff") == [20.0] * 2
    assert (llama3.layer_id, llama3.layer_ids, llama3.lr, llama3.batch_size, llama3.max_num_batches) == (7, [5, 6, 7], 5e-5, 4, 80)
    classes = {"rmu": HFRMUConfig, "sft": SFTConfig, "lm_eval": LMEvalConfig, "judge": JudgeConfig}
    assert set(classes) == set(PRESET_KINDS)
    for name in list_presets():
        kind = preset_kind(name)
        assert kind in PRESET_KINDS, f"preset {name} names no known kind ({kind})"
        assert kinds.get(name, classes[kind]) is classes[kind]
        classes[kind].from_dict(load_preset(name, kind))
        assert preset_description(name) and name in list_presets(kind)
    with pytest.raises(ConfigError, match="Unknown preset"):
        load_preset("zephyr_rmuu")


def test_a_preset_of_another_kind_is_refused_naming_where_it_belongs():
    from mneme_plugin.interventions.step import InterventionConfig

    with pytest.raises(ConfigError, match=r"Preset 'zephyr_rmu' is for `mneme intervene rmu` .*not for `mneme "
                                          r"groundtruth lm-eval` .*for the latter: mmlu_lm_eval, mmlu_pro_lm_eval, wmdp_lm_eval\."):
        load_preset("zephyr_rmu", "lm_eval")
    with pytest.raises(ConfigError, match="Preset 'zephyr_rmu' is for `mneme intervene rmu`"):
        InterventionConfig(kind="sft", preset="zephyr_rmu")
    with pytest.raises(ConfigError, match=r"Unknown preset 'aoa' \(did you mean 'aoa_sft'\?\); shipped presets of "
                                          r"this kind: alpaca_sft, aoa_sft, emergent_misalignment_sft "):
        load_preset("aoa", "sft")


def test_the_presets_command_lists_by_kind_and_prints_a_preset_whole():
    import yaml
    from click.testing import CliRunner

    from mneme_plugin.cli import main

    listing = CliRunner().invoke(main, ["intervene", "presets"])
    assert listing.exit_code == 0, listing.output
    for kind, where in PRESET_KINDS.items():  # each under its command's heading, after it and before the next
        body = listing.output.split(f"For {where}:\n", 1)[1].split("\nFor ", 1)[0]
        assert [line.split(":")[0].strip() for line in body.splitlines() if line.startswith("  ") and not
                line.startswith("      ")] == list_presets(kind)
    # the whole description (it was cut at 100 characters)
    assert " ".join(listing.output.split()).count(preset_description("zephyr_rmu")) == 1
    shown = CliRunner().invoke(main, ["groundtruth", "presets", "betley_judge"])
    assert shown.exit_code == 0, shown.output
    data = yaml.safe_load(shown.output)
    assert data.pop("kind") == "judge" and data.pop("description") and data == load_preset("betley_judge")
    unknown = CliRunner().invoke(main, ["intervene", "presets", "zephyr"])
    assert unknown.exit_code != 0 and "did you mean 'zephyr_rmu'" in unknown.output and "Traceback" not in unknown.output


def _judge_table(judge: dict) -> Any:
    from mneme_plugin.groundtruth.sources import RunGroundTruthConfig

    data = {"tables": {"em": {"judge": {"preset": "betley_judge", "base": "b", "edited": "e", "questions": "q.yaml",
                                        **judge}}}}
    return RunGroundTruthConfig.from_dict(data, section="ground_truth").tables["em"].judge


def test_an_override_of_a_nested_mapping_changes_only_the_keys_it_names(tmp_path):
    """Overriding `judge.base_url` (as betley_judge's description and `mneme groundtruth judge --help` say to)
    replaced the whole `judge` mapping: a client of kind none and no model, refused when the stage
    started; overriding `generator.max_new_tokens` switched the vllm generator to hf."""
    from mneme_plugin.commands.common import build_config
    from mneme_plugin.interventions.step import InterventionConfig

    preset = load_preset("betley_judge")
    judge = _judge_table({"judge": {"base_url": "http://127.0.0.1:9000/v1"}})
    assert judge.judge.to_dict() == JudgeConfig.from_dict(
        {**preset, "judge": {**preset["judge"], "base_url": "http://127.0.0.1:9000/v1"}}).judge.to_dict()
    assert (judge.judge.kind, judge.judge.model) == ("openai", "gpt-4o-2024-08-06")
    judge.check_ready()  # an http endpoint: no key asked for
    gen = _judge_table({"generator": {"max_new_tokens": 256}}).generator
    assert (gen.kind, gen.max_new_tokens, gen.temperature, gen.top_p) == ("vllm", 256, 1.0, 1.0)
    # The command line's --config merges the same way.
    config = tmp_path / "judge.yaml"
    config.write_text("judge: {base_url: 'http://127.0.0.1:9000/v1'}\ngenerator: {max_new_tokens: 256}\n")
    built = build_config(JudgeConfig, "judge", "betley_judge", str(config))
    assert (built.judge.kind, built.judge.model, built.judge.base_url) == ("openai", "gpt-4o-2024-08-06",
                                                                          "http://127.0.0.1:9000/v1")
    assert (built.generator.kind, built.generator.max_new_tokens) == ("vllm", 256)
    # An intervention's settings too: LoRA's rank alone, the preset's alpha, rsLoRA and modules kept.
    lora = InterventionConfig(kind="sft", preset="emergent_misalignment_sft",
                              settings={"lora": {"r": 16}}).resolved("m").lora
    assert (lora.r, lora.alpha, lora.use_rslora, len(lora.target_modules)) == (16, 64.0, True, 7)
    # Lists and other values replace the preset's: a shorter question list, no LoRA at all.
    assert _judge_table({"question_ids": ["quick_buck"]}).question_ids == ["quick_buck"]
    assert InterventionConfig(kind="sft", preset="emergent_misalignment_sft",
                              settings={"lora": None}).resolved("m").lora is None


def test_a_nested_override_key_unknown_to_its_section_is_refused_naming_it():
    from mneme_plugin.interventions.step import InterventionConfig

    with pytest.raises(ConfigError, match=r"Unknown key\(s\) in ground_truth\.tables\.em\.judge\.judge: 'base_urll' "
                                          r"\(did you mean 'base_url'\?\)"):
        _judge_table({"judge": {"base_urll": "http://127.0.0.1:9000/v1"}})
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) in ground_truth\.tables\.em\.judge\.generator: "
                                          r"'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        _judge_table({"generator": {"max_new_token": 256}})
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) in intervention\.settings\.lora: 'rank'"):
        InterventionConfig(kind="sft", preset="emergent_misalignment_sft", settings={"lora": {"rank": 16}})


def test_overrides_without_nested_mappings_merge_as_before():
    """What fingerprints: a config that overrides no nested mapping of its preset reads as it did."""
    from mneme_plugin.presets import merged_config

    flat = {"base": "b", "seed": 3, "question_ids": None, "tasks": ["x"], "lora": None, "model_args": {"a": 1}}
    for name in list_presets():
        preset = load_preset(name)
        overrides = {k: v for k, v in flat.items() if not isinstance(preset.get(k), dict)}
        assert merged_config(name, overrides) == {**preset, **overrides}, name
