"""ConfigMixin.from_dict: every value checked against its field's annotation, with clear errors."""

import dataclasses
import typing

import pytest
import yaml

from mneme_plugin.activations import HarvestConfig
from mneme_plugin.config import ConfigMixin, Seed
from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.harness import LMEvalConfig
from mneme_plugin.interpret import CollectConfig, ExplainConfig
from mneme_plugin.pipeline import RunConfig
from mneme_plugin.sideeffects import EvaluateConfig, PredictConfig, RemediateConfig


def test_values_are_coerced_where_the_intent_is_clear():
    # PyYAML reads `lr: 1e-4` as the string "1e-4": the way everyone writes it must work.
    raw = yaml.safe_load("lr: 1e-4\nbatch_size: 64.0\nsteps: '20'\n")
    assert isinstance(raw["lr"], str)
    cfg = TrainingConfig.from_dict(raw, section="training")
    assert cfg.lr == pytest.approx(1e-4) and cfg.batch_size == 64 and cfg.steps == 20
    assert isinstance(cfg.batch_size, int)
    assert PredictConfig.from_dict({"suppressed_classes": ["base_only"]}).suppressed_classes == ("base_only",)
    assert HarvestConfig.from_dict({"layer": 2, "outlier_factor": None}).outlier_factor is None


@pytest.mark.parametrize(("section", "klass", "data", "expected"), [
    ("training", TrainingConfig, {"steps": 20.5}, r"training\.steps = 20\.5 \(float\): expected an integer"),
    ("training", TrainingConfig, {"seed": None}, r"training\.seed = None .*expected an integer"),
    ("training", TrainingConfig, {"lr": "fast"}, r"training\.lr = 'fast' .*expected a number"),
    ("crosscoder", CrossCoderConfig, {"k": True}, r"crosscoder\.k = True \(bool\): expected an integer"),
    ("harvest", HarvestConfig, {"layer": 1, "drop_bos": "yes"}, r"harvest\.drop_bos = 'yes' .*true or false"),
    ("harvest", HarvestConfig, [1, 2], r"harvest must be a mapping"),
    ("harvest", HarvestConfig, "layer 3", r"harvest must be a mapping"),
    ("harvest", HarvestConfig, {}, r"harvest lacks the required key\(s\) layer"),
    ("harvest", HarvestConfig, {"layer": -1}, r"\[harvest\] layer must be an int >= 0"),
    ("explain", ExplainConfig, {"client": {"concurrency": "many"}}, r"explain\.client\.concurrency = 'many'"),
    ("explain", ExplainConfig, {"client": "openai"}, r"explain\.client must be a mapping"),
    ("predict", PredictConfig, {"suppressed_classes": "base_only"}, r"predict\.suppressed_classes .*a list"),
])
def test_bad_values_name_section_key_value_and_type(section, klass, data, expected):
    with pytest.raises(ConfigError, match=expected):
        klass.from_dict(data, section=section)


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"'stpes' \(did you mean 'steps'\?\)"):
        TrainingConfig.from_dict({"stpes": 3}, section="training")


def test_run_config_sections_are_typed_and_checked(tmp_path):
    base = {"run_dir": str(tmp_path), "models": {"base": "a", "edited": "b"}, "corpus": {"source": "c.txt"},
            "harvest": {"layer": 1}}
    cfg = RunConfig.from_dict({**base, "training": {"lr": "3e-3"}, "explain": None})
    assert isinstance(cfg.harvest, HarvestConfig) and cfg.training.lr == pytest.approx(3e-3)
    assert cfg.explain == ExplainConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"training\.steps = 1\.5"):
        RunConfig.from_dict({**base, "training": {"steps": 1.5}})
    with pytest.raises(ConfigError, match=r"training must be a mapping"):
        RunConfig.from_dict({**base, "training": [1]})
    with pytest.raises(ConfigError, match=r"lacks section\(s\) harvest"):
        RunConfig.from_dict({k: v for k, v in base.items() if k != "harvest"})
    with pytest.raises(ConfigError, match=r"'traning' \(did you mean 'training'\?\)"):
        RunConfig.from_dict({**base, "traning": {}})


def test_result_dict_leaves_out_runtime_fields():
    a = HarvestConfig(layer=1, device="cpu", batch_size=8)
    b = HarvestConfig(layer=1, device="cuda", batch_size=64)
    assert a.result_dict() == b.result_dict() and a.to_dict() != b.to_dict()
    assert HarvestConfig(layer=2).result_dict() != a.result_dict()
    explain_a = ExplainConfig.from_dict({"client": {"kind": "openai", "model": "m", "concurrency": 2}})
    explain_b = ExplainConfig.from_dict({"client": {"kind": "openai", "model": "m", "concurrency": 32}})
    assert explain_a.result_dict() == explain_b.result_dict()


@dataclasses.dataclass
class _Later(ConfigMixin):
    kept: int = 1
    scale: float = 1.0
    names: list = dataclasses.field(default_factory=list)
    later_fields = ("scale", "names")


def test_result_dict_leaves_out_later_fields_only_at_their_default():
    # What runs made before the fields existed fingerprinted: the other fields alone.
    assert _Later().result_dict() == {"kept": 1}
    assert _Later(kept=2).result_dict() == {"kept": 2}
    assert _Later(scale=2.0).result_dict() == {"kept": 1, "scale": 2.0}
    assert _Later(names=["a"]).result_dict() == {"kept": 1, "names": ["a"]}
    assert _Later().to_dict() == {"kept": 1, "scale": 1.0, "names": []}  # written in full


# ---------------------------------------------------------------- seeds (issue 11 item 6)
# A negative seed is refused by every config that takes one, before any work: the bound lives on
# the ``Seed`` annotation, checked by ``ConfigMixin.from_dict``.


@pytest.mark.parametrize("config", [TrainingConfig, CollectConfig, EvaluateConfig, RemediateConfig, LMEvalConfig])
def test_negative_seed_is_a_config_error(config):
    with pytest.raises(ConfigError, match=r"sec\.seed = -1 \(int\): expected an integer >= 0 \(random generators"):
        config.from_dict({"seed": -1}, section="sec")
    assert config.from_dict({"seed": 0}).seed == 0
    assert config.from_dict({"seed": "7"}).seed == 7  # coerced like any integer field


def test_every_config_seed_field_carries_the_bound():
    """A new config with a plain ``seed: int`` would silently lose the check."""
    import mneme_plugin.crosscoder.config as cc
    import mneme_plugin.groundtruth.harness as harness
    import mneme_plugin.groundtruth.judge as judge
    import mneme_plugin.interpret.config as interpret
    import mneme_plugin.interventions.hf_rmu as hf_rmu
    import mneme_plugin.interventions.sft as sft
    import mneme_plugin.sideeffects.config as side
    import mneme_plugin.sideeffects.remediate as remediate

    configs = [obj for module in (cc, harness, judge, interpret, hf_rmu, sft, side, remediate)
               for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, ConfigMixin) and dataclasses.is_dataclass(obj)]
    seeded = [c for c in configs if "seed" in {f.name for f in dataclasses.fields(c)}]
    assert len(seeded) >= 6
    for c in seeded:
        assert typing.get_type_hints(c, include_extras=True)["seed"] == Seed, c.__name__


def test_build_organism_refuses_a_negative_seed_before_training():
    from mneme_plugin.organism import build_organism

    with pytest.raises(ConfigError, match="seed must be an integer >= 0 .*got -2"):
        build_organism(seed=-2, progress=False)


@pytest.mark.parametrize("text, key, lines", [
    ("training:\n  steps: 10\nharvest:\n  layer: 1\ntraining:\n  lr: 0.001\n", "training", "1 and 5"),
    ("training:\n  steps: 10\n  lr: 0.001\n  steps: 20\n", "steps", "2 and 4"),
    ("models: {base: a, edited: b, base: c}\n", "base", "1 and 1"),
])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, text, key, lines):
    """PyYAML keeps the last of two equal keys without a word: a whole section (or a setting) the
    user wrote would be dropped."""
    from mneme_plugin.config import read_yaml_mapping

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"Config file .*run\.yaml: key '{key}' appears twice in one mapping "
                                          rf"\(lines {lines}\)"):
        read_yaml_mapping(path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    from mneme_plugin.config import read_yaml_mapping

    path = tmp_path / "run.yaml"
    path.write_text("defaults: &d\n  steps: 10\n  lr: 0.1\ntraining:\n  <<: *d\n  lr: 0.2\n")
    assert read_yaml_mapping(path)["training"] == {"steps": 10, "lr": 0.2}


def test_a_key_given_twice_in_a_taxonomy_file_is_refused(tmp_path):
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    path = tmp_path / "tax.yaml"
    path.write_text("entries:\n- id: a\n  keywords: [x]\n  keywords: [y]\n")
    with pytest.raises(ConfigError, match=r"tax\.yaml.*key 'keywords' appears twice in one mapping \(lines 3 and 4\)"):
        load_taxonomy(path)


def test_a_config_built_in_python_is_checked_as_a_yaml_one():
    """`TrainingConfig(steps=20.5)` trained until `range()` failed deep in the loop, after train_config.json was
    written; `CrossCoderConfig(k=True)` trained and saved `"k": true`. Now the types are checked on construction,
    with from_dict's message and coercions; `Config.of` takes a config or its mapping, as the stage functions do."""
    with pytest.raises(ConfigError, match=r"TrainingConfig\.steps = 20\.5 \(float\): expected an integer"):
        TrainingConfig(steps=20.5)
    with pytest.raises(ConfigError, match=r"CrossCoderConfig\.k = True \(bool\)"):
        CrossCoderConfig(k=True)
    with pytest.raises(ConfigError, match=r"HarvestConfig\.layer"):
        HarvestConfig(layer=[1])
    assert TrainingConfig(lr="1e-4", steps="20").lr == 1e-4 and TrainingConfig(steps="20").steps == 20
    from pathlib import Path

    assert LMEvalConfig(tasks=["t"], include_path=[Path("/tasks")]).include_path == ["/tasks"]  # a path as text
    collect = CollectConfig(harvest={"layer": 2})  # a nested section given as a mapping is built
    assert isinstance(collect.harvest, HarvestConfig) and collect.harvest.layer == 2
    assert HarvestConfig.of({"layer": 3}) == HarvestConfig(layer=3) and CrossCoderConfig.of(None) == CrossCoderConfig()
    same = TrainingConfig(steps=5)
    assert TrainingConfig.of(same) is same
    with pytest.raises(ConfigError, match="must be a mapping"):
        TrainingConfig.of(CrossCoderConfig())
    with pytest.raises(ConfigError, match=r"TrainingConfig\.steps"):
        same.replace(steps=1.5)  # replace validates again


def test_explain_config_says_what_needs_an_llm():
    """Scorers with the offline explainer demanded a client the offline path never used, and were ignored:
    refused; an LLM explainer without a client is refused; the offline one needs none."""
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.interpret.config import ExplainConfig

    with pytest.raises(ConfigError, match=r"scorers \['detection'\] run with Delphi's explainers"):
        ExplainConfig(explainer="offline", scorers=["detection"], client={"kind": "stub"})
    with pytest.raises(ConfigError, match="explainer 'default' needs an LLM client"):
        ExplainConfig(explainer="default")
    assert not ExplainConfig().calls_llm and ExplainConfig(explainer="contrastive", client={"kind": "stub"}).calls_llm
