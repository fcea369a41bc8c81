"""`mneme info` on every output of the pipeline, and the errors that name what a wrong folder is."""

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from mneme_plugin.cli import main
from tests.helpers import pipeline_inputs


@pytest.fixture(scope="module")
def finished_run(llama_dir, tmp_path_factory):
    """A finished `mneme run` on tiny local models: (run directory, base model folder)."""
    root = tmp_path_factory.mktemp("describe")
    _, edited, corpus, truth = pipeline_inputs(llama_dir, root, n_documents=200)
    config = {
        "run_dir": str(root / "run"),
        "models": {"base": str(llama_dir), "edited": str(edited)},
        "corpus": {"source": str(corpus)},
        "harvest": {"layer": 1, "context_length": 32, "dtype": "float32"},
        "crosscoder": {"expansion_factor": 4, "k": 8},
        "training": {"steps": 40, "batch_size": 128, "checkpoint_every": 20, "eval_rows": 256,
                     "keep_finished_checkpoints": True},  # `mneme info` on them
        "collect": {"per_class": 4, "n_top": 8, "n_random": 4, "n_non_activating": 4, "example_ctx_len": 16},
        "explain": {"explainer": "offline", "min_examples": 1},
        "map": {"taxonomies": ["organism"]},
        "predict": {"rule": "top_k", "k": 2},
        "ground_truth": {"scores_csv": str(truth)},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(root / "run.yaml")])
    assert result.exit_code == 0, result.output
    return root / "run", llama_dir


def _info(path):
    result = CliRunner().invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    return result.output


def test_info_on_a_run_directory_loads_no_crosscoder_library(finished_run):
    """`mneme info RUN` reads file names and JSON: it imports neither the crosscoder classes nor
    dictionary_learning (whose nnsight import took 4 of its 6 seconds on 2 cores), nor torch (the run's
    config reached it through the crosscoder config's normaliser names)."""
    import subprocess
    import sys

    code = ("import sys; from mneme_plugin.describe import describe_path; text = describe_path(sys.argv[1]); "
            "print(sorted(m for m in ('dictionary_learning', 'nnsight', 'mneme_plugin.crosscoder.model', 'torch') "
            "if m in sys.modules)); print('stage harvest' in text)")
    out = subprocess.run([sys.executable, "-c", code, str(finished_run[0])], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"], out


def test_info_describes_every_stage_output(finished_run):
    """`mneme info` knew stores, crosscoders, training runs and run directories only: on the folder of
    any later stage (or a plain model folder) it answered with an error."""
    run, base = finished_run
    assert _info(run / "attribution").startswith(f"Attribution {run / 'attribution'} (`mneme attribute`)")
    assert "  total " in _info(run / "attribution")
    contexts = _info(run / "contexts")
    assert contexts.startswith(f"Collected contexts {run / 'contexts'}") and f"base model:    {base}" in contexts
    assert _info(run / "explanations").startswith(f"Explanations {run / 'explanations'} (`mneme explain`): ")
    assert "  organism: " in _info(run / "mapping") and "latents matched a category" in _info(run / "mapping")
    predicted = json.loads((run / "prediction" / "predictions.json").read_text())["predicted"]
    assert f"rule top_k; predicted: {', '.join(predicted)}" in _info(run / "prediction")
    assert "  MNEME   Acc " in _info(run / "evaluation")
    assert _info(base).startswith(f"Hugging Face model {base}\n  architecture:  LlamaForCausalLM: d_model 32, 2 layers")
    checkpoints = _info(run / "crosscoder_run" / "checkpoints")
    assert checkpoints.startswith(f"Training checkpoints {run / 'crosscoder_run' / 'checkpoints'}: step_")


def test_info_on_a_run_assembled_by_the_stage_commands_and_on_an_interrupted_run(finished_run, tmp_path):
    run, _ = finished_run
    assembled = tmp_path / "assembled"
    for name in ("attribution", "mapping", "prediction", "evaluation"):
        shutil.copytree(run / name, assembled / name)
    summary = _info(assembled)
    assert summary.startswith(f"Run directory {assembled} (no stage markers")
    assert "stage folders: attribution, mapping, prediction, evaluation" in summary and "MNEME   Acc" in summary

    # A run stopped during training: its checkpoints, no final crosscoder, no train marker.
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    shutil.rmtree(stopped / "crosscoder_run" / "crosscoder")
    (stopped / ".stages" / "train.json").unlink()
    summary = _info(stopped)
    assert "stage train      not finished (newest checkpoint step_00000020): `mneme run` again resumes it" in summary


def test_a_wrong_folder_is_named_for_what_it_is(finished_run, tmp_path):
    """A newcomer's wrong --store / --crosscoder got "is not an activation store: manifest.json does not
    exist" or the list of every crosscoder format; now the error says what the folder is instead."""
    run, base = finished_run

    def error(args):
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        return result.output

    out = str(tmp_path / "out")
    assert (f"{run} is not an activation store: it is a run directory (its store: {run / 'activations'}; "
            f"its crosscoder: {run / 'crosscoder_run'}; its attribution: {run / 'attribution'})") in error(
        ["train", "--store", str(run), "--out", out])
    assert f"{run} holds no attribution: it is a run directory (its store: " in error(
        ["collect", "--crosscoder", str(run), "--attribution", str(run), "--base", str(base), "--edited", str(base),
         "--corpus", str(run.parent / "corpus.jsonl"), "--out", out])
    assert (f"{run / 'crosscoder_run'} is not an activation store: it is a training run (its crosscoder: "
            f"{run / 'crosscoder_run' / 'crosscoder'}; give it as --crosscoder)") in error(
        ["train", "--store", str(run / "crosscoder_run"), "--out", out])
    assert f"{run / 'activations'} is not a crosscoder: it is an activation store" in error(
        ["attribute", "--crosscoder", str(run / "activations"), "--store", str(run / "activations"), "--out", out])
    assert f"{base} is not a crosscoder: it is a Hugging Face model folder (give it as --base / --edited)" in error(
        ["attribute", "--crosscoder", str(base), "--store", str(run / "activations"), "--out", out])
    assert f"{run / 'attribution'} is not a crosscoder: it is the output of `mneme attribute`" in error(
        ["export", "saelens", str(run / "attribution"), "--out", out])
    # A run directory stands for its trained crosscoder, as a training run directory does.
    result = CliRunner().invoke(main, ["export", "saelens", str(run), "--out", out])
    assert result.exit_code == 0 and (tmp_path / "out" / "blocks.1.hook_resid_post" / "cfg.json").is_file(), result.output


def test_info_writes_undefined_metrics_as_n_a(tmp_path):
    """Nothing degraded, nothing predicted: `mneme info` printed `Acc nan  P nan`, the report `n/a`."""
    import pandas as pd

    from mneme_plugin.sideeffects import EvaluateConfig, evaluate
    from mneme_plugin.sideeffects.evaluate import save_evaluation

    scores = pd.DataFrame({"category": ["a", "b"], "before": [0.9, 0.8], "after": [0.9, 0.8]})
    save_evaluation(evaluate([], scores, config=EvaluateConfig(random_seeds=50)), tmp_path / "evaluation")
    summary = _info(tmp_path / "evaluation")
    assert "  MNEME   Acc n/a  P n/a  R n/a  F1 n/a" in summary and "nan" not in summary


def test_info_describes_a_ground_truth_folder_finished_or_not(tmp_path):
    """`mneme groundtruth lm-eval|judge` output: "holds nothing mneme writes" before; now its table's largest drops
    (against the CSV's own values), or what to do with a measurement that did not finish."""
    import pandas as pd

    from mneme_plugin.groundtruth.harness import CONFIG_FILE
    from mneme_plugin.groundtruth.table import SCORES_CSV, save_scores

    folder = tmp_path / "gt"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text("tasks: [toy]\n")
    assert "Unfinished ground truth" in _info(folder) and "`mneme groundtruth lm-eval`" in _info(folder)
    save_scores(pd.DataFrame({"category": ["law", "math", "art"], "before": [0.9, 0.8, 0.5], "after": [0.4, 0.8, 0.6]}),
                folder / SCORES_CSV)
    summary = _info(folder)
    assert "Ground truth" in summary and "categories:    3; largest drops (before - after): law +0.500, math +0.000, " \
        "art -0.100" in summary


def test_info_describes_a_demo_case_and_the_demo_output(finished_run, tmp_path):
    """`mneme info runs/demo/rmu` (a case's folder: its recipe, ground truth and run/) said the folder
    "holds nothing mneme writes"; it now describes the edit, the measured drops and the run inside."""
    from mneme_plugin.config import read_yaml_mapping
    from mneme_plugin.groundtruth.table import SCORES_CSV, save_scores, scores_table
    from mneme_plugin.organism.demo import CASE_RUN, RECIPE_FILE

    run, _ = finished_run
    case = tmp_path / "demo" / "rmu"
    shutil.copytree(run, case / CASE_RUN)
    recipe = read_yaml_mapping(run / "config.yaml")
    recipe["run_dir"] = str(case / CASE_RUN)
    recipe["models"]["intervention"] = "RMU unlearning of law knowledge"
    (case / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    save_scores(scores_table({"law": 0.95, "cooking": 0.9}, {"law": 0.1, "cooking": 0.92}, {"law": 32, "cooking": 32}),
                case / SCORES_CSV)

    summary = _info(case)
    assert summary.startswith(f"Demo case {case} (`mneme demo`): RMU unlearning of law knowledge\n")
    assert f"  ground truth:  {SCORES_CSV}, measured drop per category: law +0.85, cooking -0.02\n" in summary
    assert f"\n  MNEME run {case / CASE_RUN}\n    stage harvest " in summary and "    MNEME   Acc " in summary

    # No remediation beside the run: the summary says why (from the run's evaluation), not nothing.
    from mneme_plugin.sideeffects.evaluate import load_evaluation

    evaluation = load_evaluation(case / CASE_RUN / "evaluation")
    why = ("nothing degraded" if not evaluation.true_set else f"{', '.join(evaluation.true_set)} degraded, but MNEME "
           "named no side effect" if not evaluation.predicted.get("MNEME") else "the demo stopped before it")
    assert f"\n  remediation:   none ({why}" in summary, summary
    # Planted: nothing degraded; then degraded, and MNEME naming nothing.
    written = json.loads((case / CASE_RUN / "evaluation" / "evaluation.json").read_text())
    for row in written["truth"]:
        row["degraded"] = False
    (case / CASE_RUN / "evaluation" / "evaluation.json").write_text(json.dumps(written))
    assert "\n  remediation:   none (nothing degraded, so there is no lost accuracy to recover)" in _info(case)
    written["truth"][0]["degraded"], written["predicted"]["MNEME"] = True, []
    (case / CASE_RUN / "evaluation" / "evaluation.json").write_text(json.dumps(written))
    assert (f"\n  remediation:   none ({written['truth'][0]['category']} degraded, but MNEME named no side effect, "
            "so there is nothing to retrain on)") in _info(case)

    demo = _info(case.parent)
    assert demo.startswith(f"Demo output {case.parent} (`mneme demo`): 1 case folder (")
    assert "  rmu:               RMU unlearning of law knowledge" in demo
    wrong = CliRunner().invoke(main, ["train", "--store", str(case), "--out", str(tmp_path / "out")])
    assert f"{case} is not an activation store: it is a `mneme demo` case (its run directory: {case / CASE_RUN})" \
        in wrong.output


def test_info_on_an_unfinished_demo_case_names_the_stages_done_and_those_missing(finished_run, tmp_path):
    """A `mneme demo` case whose run stopped after training listed the stages done and nothing else, as if
    the run were whole; one stopped in its first stage was "nothing mneme writes"."""
    from mneme_plugin.config import read_yaml_mapping
    from mneme_plugin.organism.demo import CASE_RUN, RECIPE_FILE

    run, _ = finished_run
    case = tmp_path / "demo" / "rmu"
    shutil.copytree(run, case / CASE_RUN)
    recipe = read_yaml_mapping(run / "config.yaml")
    recipe["run_dir"] = str(case / CASE_RUN)
    (case / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    later = ["attribute", "collect", "explain", "map", "predict", "evaluate", "report"]
    for stage in later:
        (case / CASE_RUN / ".stages" / f"{stage}.json").unlink()
    for folder in ("attribution", "contexts", "explanations", "mapping", "prediction", "evaluation"):
        shutil.rmtree(case / CASE_RUN / folder)
    (case / CASE_RUN / "report.html").unlink()

    summary = _info(case)
    assert "    stage harvest " in summary and "    stage train " in summary, summary
    assert "\n  remediation:   none (the case's run has no evaluation yet: the demo stopped before it;" in summary
    assert f"    stages not done: {', '.join(later)} (the run stopped before them, or --only left them out)" in summary, summary

    # Stopped in its first stage: the run's config, no marker yet.
    shutil.rmtree(case / CASE_RUN / ".stages")
    for folder in ("crosscoder_run", "activations"):
        shutil.rmtree(case / CASE_RUN / folder)
    summary = _info(case)
    assert summary.startswith(f"Demo case {case} (`mneme demo`)"), summary
    assert "    no stage done yet" in summary, summary
    assert f"    stages not done: harvest, train, {', '.join(later)}" in summary, summary


def test_a_stage_command_run_into_a_run_directory_unmarks_what_no_longer_follows_its_config(finished_run, tmp_path):
    """`mneme predict --run-dir RUN --rule ...` over a `mneme run` directory: the predict, evaluate and report
    markers go (the prediction is not config.yaml's any more; `mneme run` redoes them, which it skipped
    before), the stale evaluation is named by `mneme info` and left out of the report."""
    import yaml

    from mneme_plugin.report.build import gather

    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((run.parent / "run.yaml").read_text())
    config["run_dir"] = str(copy)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert gather(copy).metrics_table is not None
    # Explanations written beside the contexts (no --out) are no stage's outputs: every marker stays.
    markers = sorted(p.stem for p in (copy / ".stages").glob("*.json"))
    result = CliRunner().invoke(main, ["explain", str(copy / "contexts")])
    assert result.exit_code == 0 and "no longer marked done" not in result.output, result.output
    assert sorted(p.stem for p in (copy / ".stages").glob("*.json")) == markers
    result = CliRunner().invoke(main, ["predict", "--run-dir", str(copy), "--rule", "top_k", "-k", "1"])
    assert result.exit_code == 0, result.output
    assert "its stage(s) predict, evaluate, report are no longer marked done" in result.output
    assert sorted(p.stem for p in (copy / ".stages").glob("*.json")) == ["attribute", "collect", "explain", "harvest",
                                                                         "map", "train"]
    # This tiny run predicts nothing with either rule: the evaluation is made to have scored an earlier prediction.
    evaluation = copy / "evaluation" / "evaluation.json"
    stale = json.loads(evaluation.read_text())
    stale["predicted"]["MNEME"] = ["law"]
    evaluation.write_text(json.dumps(stale))
    assert "this evaluation scored an earlier prediction; " in _info(copy)
    assert gather(copy).metrics_table is None  # not the metrics of another prediction
    # `mneme run` redoes what no longer follows config.yaml, and the evaluation scores the prediction beside it.
    result = CliRunner().invoke(main, ["run", str(tmp_path / "run.yaml")])
    assert result.exit_code == 0, result.output
    assert "[map] done before with the same config: skipped" in result.output, result.output
    assert all(f"[{stage}] running" in result.output for stage in ("predict", "evaluate", "report")), result.output
    assert "earlier prediction" not in _info(copy) and gather(copy).metrics_table is not None


def test_train_and_harvest_commands_run_into_a_run_directory_unmark_what_they_replace(finished_run, tmp_path):
    """`mneme train --out RUN/crosscoder_run --no-resume` and `mneme harvest --out RUN/activations --overwrite`
    replace the run's crosscoder or store, but (unlike the other stage commands) left every stage marked done:
    `mneme run` skipped them all over a crosscoder or store config.yaml did not make."""
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((run.parent / "run.yaml").read_text())
    stages = sorted(p.stem for p in (copy / ".stages").glob("*.json"))

    def marked():
        return sorted(p.stem for p in (copy / ".stages").glob("*.json"))

    train = ["train", "--store", str(copy / "activations"), "--out", str(copy / "crosscoder_run"), "--steps", "25",
             "--expansion-factor", "2", "-k", "4", "--eval-rows", "256"]
    refused = CliRunner().invoke(main, train)  # resumes a finished training of another config: refused, unchanged
    assert refused.exit_code != 0 and "another config" in refused.output and marked() == stages
    result = CliRunner().invoke(main, [*train, "--no-resume"])
    assert result.exit_code == 0, result.output
    assert "its stage(s) train, attribute, collect, explain, map, predict, evaluate, report are no longer marked " \
           "done" in " ".join(result.output.split()), result.output
    assert marked() == ["harvest"]

    harvest = ["harvest", "--base", config["models"]["base"], "--edited", config["models"]["edited"], "--corpus",
               config["corpus"]["source"], "--context-length", "32", "--dtype", "float32", "--out", str(copy / "activations")]
    result = CliRunner().invoke(main, [*harvest, "--layer", "1"])  # the store is complete: kept as it is
    assert result.exit_code == 0 and "no longer marked done" not in result.output, result.output
    assert marked() == ["harvest"]
    result = CliRunner().invoke(main, [*harvest, "--layer", "0", "--overwrite"])
    assert result.exit_code == 0 and "its stage(s) harvest are no longer marked done" in result.output, result.output
    assert marked() == []


def test_info_names_an_export_a_remediation_and_a_file_of_a_run(finished_run, tmp_path):
    """`mneme info` said "holds nothing mneme writes" of an SAE-Lens export (which load_crosscoder reads), of a
    `mneme remediate` output and of any file in a run directory."""
    run, base = finished_run
    exported = CliRunner().invoke(main, ["export", "saelens", str(run / "crosscoder_run"), "--out", str(tmp_path / "sl")])
    assert exported.exit_code == 0, exported.output
    folder = next(p for p in (tmp_path / "sl").iterdir() if p.is_dir())
    summary = _info(folder)
    assert summary.startswith(f"Crosscoder {folder} (mneme SAE-Lens export: load_crosscoder reads it") and "k=8" in summary
    shutil.copytree(base, tmp_path / "remediated" / "model")
    assert _info(tmp_path / "remediated").startswith(f"Remediation output {tmp_path / 'remediated'} (`mneme remediate`)")
    summary = _info(run / "config.yaml")
    assert summary.startswith(f"{run / 'config.yaml'} is a file; the folder it is in:\nMNEME run {run}"), summary


def test_info_on_a_published_crosscoder_folder_of_each_layout(tmp_path):
    """A science-of-finetuning hub folder holds config.json + model.safetensors, the names of our own crosscoder
    files: `mneme info` read it as ours and failed ("not a mneme crosscoder config"); it is described as theirs,
    with the figures load_crosscoder reads, like their training output and Kissane's folders."""
    from mneme_plugin.formats import load_crosscoder
    from tests.helpers import kissane_state_dict, sof_state_dict, write_kissane_crosscoder, write_sof_crosscoder

    sd = sof_state_dict(16, 48, 4, "SAE", threshold=0.25)
    folders = {"hub": write_sof_crosscoder(tmp_path / "hub", sd, "hub", code_normalization="SAE"),
               "local": write_sof_crosscoder(tmp_path / "local", sd, "local", code_normalization="SAE"),
               "kissane": write_kissane_crosscoder(tmp_path / "k", kissane_state_dict())}
    for layout, folder in folders.items():
        result = CliRunner().invoke(main, ["info", str(folder)])
        assert result.exit_code == 0, (layout, result.output)
        title = "Kissane" if layout == "kissane" else "science-of-finetuning"
        assert f"Crosscoder {folder} ({title}: load_crosscoder reads it" in result.output, result.output
        cc = load_crosscoder(folder)
        scales = ", ".join(f"{s:.4g}" for s in cc.activation_scale.tolist())
        assert (f"{type(cc).__name__}: d=16, latents=48, k={cc.cfg.k}, salience={cc.cfg.salience}" in result.output
                and f"activation scale: {scales} (base, edited)" in result.output), result.output
        if layout != "kissane":
            assert "salience=sae" in result.output and "inference threshold: 0.25" in result.output
