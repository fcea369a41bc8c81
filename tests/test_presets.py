"""The shipped presets: every one is a valid config of its class; the published settings."""

from __future__ import annotations

import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.harness import LMEvalConfig
from mneme_plugin.groundtruth.judge import JudgeConfig
from mneme_plugin.interventions.hf_rmu import HFRMUConfig
from mneme_plugin.interventions.sft import SFTConfig
from mneme_plugin.presets import list_presets, load_preset, preset_description


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
    for name in list_presets():
        cls = LMEvalConfig if name.endswith("_lm_eval") else JudgeConfig if name.endswith("_judge") else kinds.get(name)
        assert cls is not None, f"preset {name} has no known config class"
        cls.from_dict(load_preset(name))
        assert preset_description(name)
    with pytest.raises(ConfigError, match="Unknown preset"):
        load_preset("zephyr_rmuu")
