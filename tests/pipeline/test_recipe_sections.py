"""The optional `intervention` and `ground_truth.tables` sections of a run config: validation and the
stage fingerprints they do (and do not) change. No model is loaded."""

import hashlib
import json

import pytest

from mneme_plugin.errors import ConfigError
from mneme_plugin.pipeline import RunConfig, plan
from mneme_plugin.pipeline.run import _fingerprint
from mneme_plugin.pipeline.stages import STAGES

BASE = {"run_dir": "runs/x", "models": {"base": "b", "edited": "e"}, "corpus": {"source": "c.txt"},
        "harvest": {"layer": 1}, "ground_truth": {"scores_csv": "gt.csv"}}
TABLES = {"tables": {"mmlu": {"taxonomy": "mmlu", "lm_eval": {"preset": "mmlu_lm_eval", "limit": 5}},
                     "em": {"taxonomy": "emergent_misalignment",
                            "judge": {"preset": "betley_judge", "questions": "q.yaml"}}}}
INTERVENTION = {"kind": "rmu", "preset": "zephyr_rmu", "settings": {"max_num_batches": 10}}


def _statuses(cfg: dict) -> dict:
    return {s.name: (fp, st) for s, fp, st in plan(RunConfig.from_dict(cfg), STAGES)}


def test_a_config_without_the_new_sections_plans_as_before():
    cfg = RunConfig.from_dict(BASE)
    stages = _statuses(BASE)
    assert list(stages)[:2] == ["harvest", "train"]  # no intervention / ground_truth stage at all
    # The harvest fingerprint, written out independently: sha256 of its sections (the models by name), no upstream.
    payload = {"models.base": "b", "models.edited": "e",
               **{name: getattr(cfg, name).result_dict() for name in ("corpus", "harvest")}}
    text = json.dumps({"stage": "harvest", "config": payload, "upstream": ""}, sort_keys=True, default=str)
    assert stages["harvest"][0] == hashlib.sha256(text.encode()).hexdigest()[:16]
    # What version 2 markers hold (the whole models section) is what they are still compared with.
    payload = {name: getattr(cfg, name).result_dict() for name in ("models", "corpus", "harvest")}
    text = json.dumps({"stage": "harvest", "config": payload, "upstream": ""}, sort_keys=True, default=str)
    harvest = next(s for s in STAGES if s.name == "harvest")
    assert _fingerprint(cfg, harvest, "", version=2) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert "tables" not in cfg.ground_truth.result_dict()


def test_measured_ground_truth_does_not_touch_the_crosscoder_and_an_edit_redoes_everything():
    plain = _statuses({**BASE, "map": {"taxonomies": ["mmlu", "emergent_misalignment"]}})
    measured = _statuses({**BASE, "ground_truth": TABLES, "map": {"taxonomies": ["mmlu", "emergent_misalignment"]}})
    assert list(measured)[0] == "ground_truth"
    for stage in ("harvest", "train", "attribute", "map"):
        assert measured[stage][0] == plain[stage][0], stage
    # Predict predicts for the tables' taxonomies too (mmlu alone before), each into its own folder.
    assert measured["predict"][0] != plain["predict"][0] and measured["evaluate"][0] != plain["evaluate"][0]
    edited = _statuses({**BASE, "models": {"base": "b", "edited": "intervention"}, "intervention": INTERVENTION})
    assert list(edited)[0] == "intervention"
    assert edited["harvest"][0] != plain["harvest"][0] and edited["train"][0] != plain["train"][0]
    # A changed RMU setting changes the edit and what follows it.
    changed = _statuses({**BASE, "models": {"base": "b", "edited": "intervention"},
                         "intervention": {**INTERVENTION, "settings": {"max_num_batches": 11}}})
    assert changed["intervention"][0] != edited["intervention"][0] and changed["harvest"][0] != edited["harvest"][0]


def test_presets_are_merged_and_the_edit_uses_the_base_model():
    cfg = RunConfig.from_dict({**BASE, "ground_truth": TABLES, "map": {"taxonomies": ["mmlu", "emergent_misalignment"]},
                               "models": {"base": "b", "edited": "intervention"}, "intervention": INTERVENTION})
    assert cfg.ground_truth.tables["em"].judge.samples_per_question == 100  # from betley_judge
    assert cfg.ground_truth.tables["mmlu"].lm_eval.tasks == ["mmlu"] and cfg.ground_truth.tables["mmlu"].lm_eval.limit == 5
    settings = cfg.intervention.resolved("b")
    assert settings.model == "b" and settings.alpha == 1200.0 and settings.max_num_batches == 10
    assert cfg.model_spec("edited").endswith("edited_model") and cfg.taxonomies() == ["mmlu", "emergent_misalignment"]


@pytest.mark.parametrize(("change", "expected"), [
    ({"intervention": INTERVENTION}, "set models.edited to 'intervention'"),
    ({"models": {"base": "b", "edited": "intervention"}}, "has no intervention section"),
    ({"models": {"base": "b", "edited": "intervention"}, "intervention": {**INTERVENTION, "kind": "lora"}},
     "intervention.kind must be one of"),
    ({"models": {"base": "b", "edited": "intervention"},
      "intervention": {**INTERVENTION, "settings": {"alhpa": 3}}}, "did you mean 'alpha'"),
    ({"models": {"base": "b", "edited": "intervention"},
      "intervention": {**INTERVENTION, "settings": {"model": "x"}}}, "leave `model` out"),
    ({"ground_truth": TABLES}, "that map.taxonomies lacks"),
    ({"ground_truth": {"tables": {"t": {"scores_csv": "a.csv", "lm_eval": {"tasks": ["mmlu"]}}}}}, "exactly one source"),
    ({"ground_truth": {"scores_csv": "a.csv", "tables": {"t": {"scores_csv": "a.csv"}}}}, "not both"),
    ({"ground_truth": {"tables": {"t": {"judge": {"preset": "no_such"}}}}}, "Unknown preset"),
])
def test_bad_sections_are_clear_errors(change, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_dict({**BASE, **change})


def test_an_edited_taxonomy_or_a_redone_control_changes_only_the_stages_that_read_them(tmp_path):
    taxonomy = tmp_path / "tax.yaml"
    entries = [{"id": "a", "name": "alpha", "keywords": ["x"]}, {"id": "b", "name": "beta", "keywords": ["y"]}]
    taxonomy.write_text(json.dumps({"name": "tax", "entries": entries}))
    control = tmp_path / "control"
    (control / "attribution").mkdir(parents=True)
    (control / "attribution" / "attribution.parquet").write_bytes(b"first")
    cfg = {**BASE, "map": {"taxonomies": [str(taxonomy)]}, "predict": {"control_run": str(control)}}
    before = _statuses(cfg)
    entries[1]["keywords"] = ["y", "z"]
    taxonomy.write_text(json.dumps({"name": "tax", "entries": entries}))
    edited = _statuses(cfg)
    (control / "attribution" / "attribution.parquet").write_bytes(b"second")
    redone = _statuses(cfg)
    for stage in ("harvest", "train", "attribute", "collect", "explain"):
        assert before[stage][0] == edited[stage][0] == redone[stage][0], stage
    assert before["map"][0] != edited["map"][0] == redone["map"][0]
    assert before["predict"][0] != edited["predict"][0] != redone["predict"][0]
    assert edited["evaluate"][0] != redone["evaluate"][0]  # it reads the new prediction
