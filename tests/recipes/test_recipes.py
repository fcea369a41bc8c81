"""The case-study recipes: every real config dry-runs offline (fast); every smoke.yaml runs end to end (slow)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.pipeline import RunConfig
from mneme_plugin.sideeffects import load_evaluations, load_prediction, prediction_folder

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CASE_STUDIES = ("wmdp_rmu", "emergent_misalignment", "benign_finetuning")
REAL_CONFIGS = sorted(p for name in CASE_STUDIES for p in (RECIPES / name).glob("*.yaml") if p.name != "smoke.yaml")


def test_every_case_study_has_configs_a_smoke_run_and_a_readme():
    for name in CASE_STUDIES:
        folder = RECIPES / name
        assert (folder / "smoke.yaml").is_file() and (folder / "make_smoke.py").is_file(), name
        readme = (folder / "README.md").read_text()
        assert "not been reproduced" in readme and "| " in readme, name  # the honest statement and the table
        assert any(p.parent == folder for p in REAL_CONFIGS), name


@pytest.mark.parametrize("config", REAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_real_recipe_dry_runs_offline(config, monkeypatch, tmp_path, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # nothing downloaded: the recipe's data files are missing here
    result = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    assert result.exit_code == 0, result.output
    cfg = RunConfig.from_yaml(config)
    # Offline and not in the (empty) hub cache: `mneme run` would refuse the base model here; the dry run warns.
    assert f"WARN models.base: the hub model {cfg.models.base} is neither" in result.output, result.output
    assert "(`mneme run` refuses it on this machine)" in result.output
    assert "Estimates (one H100-class GPU, rough):" in result.output and "train: ~" in result.output
    assert "d_model" in result.output  # the architecture came from the known-architectures table
    if cfg.intervention is not None:
        assert "intervention run" in result.output.replace("  ", " ").replace("  ", " ")
    assert "ground_truth" in result.output
    raw = yaml.safe_load(config.read_text())
    if "meta-llama/" in str(raw):
        assert "Gated models / data sets" in result.output
    local = [v for t in cfg.ground_truth.tables.values() if t.judge is not None for v in [t.judge.questions]]
    for path in local:
        assert path in result.output  # named as data to fetch


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_STUDIES)
def test_smoke_recipe_runs_end_to_end_offline(name, tmp_path):
    """From a clean folder and no network: generate the smoke data, run every step, get the report."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(RECIPES.parent))
    subprocess.run([sys.executable, str(RECIPES / name / "make_smoke.py")], cwd=tmp_path, env=env, check=True)
    run = subprocess.run([sys.executable, "-m", "mneme_plugin.cli", "run", str(RECIPES / name / "smoke.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cfg = RunConfig.from_yaml(RECIPES / name / "smoke.yaml")
    root = tmp_path / cfg.run_dir
    assert (root / "edited_model" / "config.json").is_file()
    page = (root / "report.html").read_text()
    assert "SMOKE TEST (plumbing only)" in page
    evaluations = load_evaluations(root / "evaluation")
    for table, spec in cfg.ground_truth.tables.items():
        assert (root / "ground_truth" / f"{table}.csv").is_file()
        assert f"Metrics (paper Table 1) — {table} (taxonomy {spec.taxonomy})" in page
        # The smoke edit is strong enough that MNEME predicts something, and that prediction reaches
        # the evaluation and the report (prediction -> evaluation -> report with a non-empty set).
        predicted = load_prediction(prediction_folder(root, spec.taxonomy, cfg.map.taxonomies)).predicted
        assert predicted, f"{name}: no category predicted for taxonomy {spec.taxonomy}"
        assert sorted(evaluations[table].predicted["MNEME"]) == sorted(predicted)
        shown = [set(line.split(", ")) for line in re.findall(r"<b>Predicted[^<]*</b>: ([^<(]+?)(?: \(verdict|</li>)", page)]
        assert set(predicted) in shown, (predicted, shown)
    # A second run finds every step done.
    again = subprocess.run([sys.executable, "-m", "mneme_plugin.cli", "run", str(RECIPES / name / "smoke.yaml")],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "running." not in again.stderr + again.stdout
