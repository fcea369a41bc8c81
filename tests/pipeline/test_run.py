"""``mneme run``: the whole pipeline on tiny local models; skip, resume after a kill, dry run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.crosscoder import BatchTopKCrossCoder
from mneme_plugin.errors import ConfigError
from mneme_plugin.pipeline import RunConfig
from tests.helpers import (
    FakeLLM, pipeline_inputs, save_finetuned_llama, synthetic_corpus, write_jsonl, write_lm_eval_task,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair_and_corpus(llama_dir, tmp_path_factory):
    return pipeline_inputs(llama_dir, tmp_path_factory.mktemp("pipeline"))


def _config(run_dir, base, edited, corpus, truth, steps=120) -> dict:
    return {
        "run_dir": str(run_dir),
        "models": {"base": str(base), "edited": str(edited), "intervention": "unlearning of biology and genes"},
        "corpus": {"source": str(corpus)},
        "harvest": {"layer": 1, "context_length": 32, "dtype": "float32"},
        "crosscoder": {"expansion_factor": 4, "k": 8},
        "training": {"steps": steps, "batch_size": 128, "lr": 3e-3, "warmup_steps": 5, "threshold_start_step": 20,
                     "checkpoint_every": 20, "eval_rows": 256, "dead_after_tokens": 20_000},
        "attribution": {"batch_size": 512, "device": "cpu"},
        "collect": {"per_class": 4, "n_top": 8, "n_random": 4, "n_non_activating": 4, "example_ctx_len": 16},
        "explain": {"explainer": "offline", "min_examples": 1},
        "map": {"taxonomies": ["organism"]},
        "predict": {"rule": "top_k", "k": 2},
        "ground_truth": {"scores_csv": str(truth)},
    }


def _write(tmp_path, name, cfg) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_run_skips_done_stages_and_resumes_after_a_kill(pair_and_corpus, tmp_path):
    base, edited, corpus, truth = pair_and_corpus
    reference = _config(tmp_path / "ref", base, edited, corpus, truth)
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "ref.yaml", reference)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ref = tmp_path / "ref"
    for part in ("activations/manifest.json", "crosscoder_run/metrics.json", "attribution/attribution.parquet",
                 "contexts/contexts.json", "explanations/explanations.parquet", "mapping/categories.parquet",
                 "prediction/predictions.json", "evaluation/evaluation.json", "report.html"):
        assert (ref / part).exists(), part
    # The metrics table once, at the end (the evaluate stage logged it too, so `mneme run` showed it twice).
    assert result.output.count("| method | Acc (Eq. 4) |") == 1, result.output
    assert result.output.rstrip().endswith("| oracle | 1.000 | 1.000 | 1.000 | 1.000 | 1 | 1 |"), result.output
    summary = CliRunner().invoke(main, ["info", str(ref)]).output
    assert "stage harvest" in summary and "stage report" in summary and "MNEME   Acc" in summary

    # Every stage is done: a second run skips them all.
    marker_times = {p.name: p.stat().st_mtime_ns for p in (ref / ".stages").iterdir()}
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "ref.yaml", reference)], catch_exceptions=False)
    assert result.exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (ref / ".stages").iterdir()} == marker_times
    assert result.output.count("| method | Acc (Eq. 4) |") == 1, result.output  # skipped stages: still shown

    # A run killed during training resumes and ends with the same outputs.
    killed = _config(tmp_path / "killed", base, edited, corpus, truth)
    path = _write(tmp_path, "killed.yaml", killed)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mneme_plugin.cli", "run", path], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "crosscoder_run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(checkpoints.glob("step_*")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed during training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "crosscoder_run" / "crosscoder").exists()
    result = CliRunner().invoke(main, ["run", path], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    a = BatchTopKCrossCoder.from_pretrained(ref / "crosscoder_run" / "crosscoder")
    b = BatchTopKCrossCoder.from_pretrained(tmp_path / "killed" / "crosscoder_run" / "crosscoder")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    for table in ("attribution/attribution.parquet", "mapping/categories.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(ref / table), pd.read_parquet(tmp_path / "killed" / table))
    assert (json.loads((ref / "prediction/predictions.json").read_text())["predicted"]
            == json.loads((tmp_path / "killed/prediction/predictions.json").read_text())["predicted"])


def test_a_changed_section_reruns_that_stage_and_those_after(pair_and_corpus, tmp_path, caplog):
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg)]).exit_code == 0
    cfg["predict"]["k"] = 1
    statuses = {s.name: status for s, _, status in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses["train"] == "skip (done)" and statuses["map"] == "skip (done)"
    assert statuses["predict"].startswith("rerun") and statuses["report"].startswith("rerun")
    # A stage whose marker is gone runs again, and so does every stage that reads it, though their
    # configs are unchanged (a report made by `--only report` before the stages it shows is redone).
    cfg["predict"]["k"] = 2
    (tmp_path / "run" / ".stages" / "attribute.json").unlink()
    statuses = {s.name: status for s, _, status in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses["train"] == "skip (done)" and statuses["attribute"] == "run"
    assert all(statuses[name] == "rerun (input redone)" for name in ("collect", "predict", "evaluate", "report"))
    # An unreadable marker is no proof either: a warning names it, and it runs again.
    (tmp_path / "run" / ".stages" / "train.json").write_text('{"stage": "tra')
    import logging

    logging.getLogger("mneme_plugin").addHandler(caplog.handler)  # the CLI above stopped its propagation
    try:
        statuses = {s.name: status for s, _, status in plan(RunConfig.from_dict(cfg), STAGES)}
    finally:
        logging.getLogger("mneme_plugin").removeHandler(caplog.handler)
    assert statuses["train"] == "run" and "train.json is unreadable" in caplog.text


def test_only_a_redone_stage_removes_the_stages_made_from_its_old_outputs(pair_and_corpus, tmp_path):
    """`mneme run --only train` after a training change: config.yaml takes the new config and the crosscoder is
    redone, so the attribution .. report made from the old one must not stay marked done (`mneme info` listed
    them done and showed the old evaluation as this run's); the stages before it, and a no-op --only, keep theirs."""
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    run = tmp_path / "run"
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg)]).exit_code == 0
    cfg["training"]["steps"] = 40
    path = _write(tmp_path, "b.yaml", cfg)
    # Only harvest, which is done: nothing runs, nothing goes.
    assert CliRunner().invoke(main, ["run", path, "--only", "harvest"]).exit_code == 0
    assert (run / ".stages" / "evaluate.json").is_file() and (run / "evaluation").is_dir()
    dry = CliRunner().invoke(main, ["run", "--dry-run", path, "--only", "train"])
    assert "attribute  not selected (--only); its outputs go: rerun (config changed)" in dry.output, dry.output
    assert "harvest    not selected (--only)    config" in dry.output

    result = CliRunner().invoke(main, ["run", path, "--only", "train"])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in (run / ".stages").glob("*.json")) == ["harvest", "train"]
    for gone in ("attribution", "contexts", "explanations", "mapping", "prediction", "evaluation", "report.html"):
        assert not (run / gone).exists(), gone
    info = CliRunner().invoke(main, ["info", str(run)]).output
    assert "stage attribute" not in info and "MNEME   Acc" not in info
    assert "stages not done: attribute, collect" in info
    statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses["train"] == "skip (done)" and statuses["attribute"] == statuses["report"] == "run"


def test_a_stage_the_config_no_longer_runs_loses_what_it_did_and_cannot_be_selected(pair_and_corpus, tmp_path):
    """The ground truth dropped from the config disables evaluate: its old evaluation went on showing in the
    report, `mneme info` and the run's table as this config's result. And `--only evaluate` (disabled) or
    `--only intervention` (no such section) ran nothing and exited 0 as if done."""
    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    run = tmp_path / "run"
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg)]).exit_code == 0
    assert (run / "evaluation").is_dir()
    del cfg["ground_truth"]
    path = _write(tmp_path, "b.yaml", cfg)
    for only, why in (("evaluate", "disabled (the config has no ground truth to evaluate against"),
                      ("intervention", "not in this run (the config has no intervention section)")):
        refused = CliRunner().invoke(main, ["run", path, "--only", only])
        assert refused.exit_code != 0 and "Traceback" not in refused.output
        assert f"--only {only}: the stage is {why}" in " ".join(refused.output.split()), refused.output
        dry = CliRunner().invoke(main, ["run", "--dry-run", path, "--only", only])
        assert dry.exit_code != 0 and f"--only {only}: the stage is" in dry.output
    assert (run / "evaluation").is_dir()  # refused: nothing changed
    dry = CliRunner().invoke(main, ["run", "--dry-run", path])
    assert "evaluate   disabled; its outputs go" in dry.output, dry.output

    result = CliRunner().invoke(main, ["run", path])
    assert result.exit_code == 0, result.output
    assert not (run / "evaluation").exists() and not (run / ".stages" / "evaluate.json").exists()
    assert "| method | Acc (Eq. 4) |" not in result.output
    assert "MNEME   Acc" not in CliRunner().invoke(main, ["info", str(run)]).output
    assert "oracle" not in (run / "report.html").read_text()


def _run_with_harvest_done(tmp_path):
    """A run config (fake models and corpus; only the plan reads it) and its run directory, whose harvest
    is marked done under that config: (config dict, run directory)."""
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.run import MARKER_VERSION
    from mneme_plugin.pipeline.stages import STAGES

    cfg = {"run_dir": str(tmp_path / "run"), "models": {"base": "b", "edited": "e"},
           "corpus": {"source": "hf:c"}, "harvest": {"layer": 1}}
    done = {s.name: fp for s, fp, _ in plan(RunConfig.from_dict(cfg), STAGES)}
    run = tmp_path / "run"
    (run / "activations").mkdir(parents=True)
    (run / ".stages").mkdir()
    (run / ".stages" / "harvest.json").write_text(json.dumps(
        {"stage": "harvest", "fingerprint": done["harvest"], "seconds": 1.0, "version": MARKER_VERSION}))
    return cfg, run


def test_an_interrupted_stage_starts_over_when_what_it_read_is_redone(tmp_path):
    """Training killed after a checkpoint, then the harvest's config changed: the harvest is redone,
    and training must not resume from checkpoints made on the old activations."""
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.run import UPSTREAM_REDONE, discard_redone
    from mneme_plugin.pipeline.stages import STAGES

    cfg, run = _run_with_harvest_done(tmp_path)
    checkpoint = run / "crosscoder_run" / "checkpoints" / "step_00000020"
    checkpoint.mkdir(parents=True)  # training killed: a checkpoint, no marker
    assert {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}["train"] == "run"  # resumes

    cfg["harvest"]["normalization_tokens"] = 5_000
    planned = plan(RunConfig.from_dict(cfg), STAGES)
    statuses = {s.name: (s, st) for s, _, st in planned}
    assert statuses["harvest"][1] == "rerun (config changed)"
    status = statuses["train"][1]
    assert status == UPSTREAM_REDONE
    discard_redone(planned, RunConfig.from_dict(cfg).layout)  # what a run does before its first stage
    assert not checkpoint.exists()
    assert statuses["attribute"][1] == "run"  # nothing of it on disk: nothing to throw away


def test_a_run_killed_while_it_deletes_a_redone_stage_leaves_that_stage_not_done(tmp_path, monkeypatch):
    """The harvest's config changed and the run is killed while it deletes the old store: the store is half
    gone, so its marker must be gone first (with the old config back, the plan skipped the damaged store)."""
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline import run as pipeline_run
    from mneme_plugin.pipeline.stages import STAGES

    cfg, run = _run_with_harvest_done(tmp_path)
    for i in range(4):
        (run / "activations" / f"shard_{i:05d}.safetensors").write_text("x")
    assert {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}["harvest"] == "skip (done)"

    def killed_midway(path, *args, **kwargs):
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_run.shutil, "rmtree", killed_midway)
    changed = {**cfg, "harvest": {"layer": 1, "max_tokens": 4000}}
    with pytest.raises(KeyboardInterrupt):
        pipeline_run.discard_redone(plan(RunConfig.from_dict(changed), STAGES), RunConfig.from_dict(changed).layout)
    assert len(list((run / "activations").iterdir())) == 3  # half deleted
    assert not (run / ".stages" / "harvest.json").exists()
    assert {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}["harvest"] == "run"


def test_a_run_that_stops_early_leaves_no_outputs_of_the_old_config(tmp_path):
    """A changed config redoes explain and the stages after it; the run stops (killed, or failed) in
    explain. The old prediction must not stay next to the new config.yaml, marked done: `mneme info`,
    `evaluate --run-dir`, `pool` and `report` would read it as the new config's."""
    from mneme_plugin.pipeline import read_stage_markers, run_pipeline
    from mneme_plugin.pipeline.config import load_run_config
    from mneme_plugin.pipeline.stage import Stage

    def write(name):
        def run(ctx):
            if ctx.config.explain.n_terms == 3:
                raise RuntimeError("stopped in explain")
            folder = getattr(ctx.layout, name)
            folder.mkdir()
            (folder / "out.txt").write_text(str(ctx.config.explain.n_terms))
        return run

    stages = [Stage("explain", ("explain",), lambda l: l.explanations, write("explanations")),
              Stage("predict", ("predict",), lambda l: l.prediction, write("prediction"))]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text\n")
    cfg = {"run_dir": str(tmp_path / "run"), "models": {"base": "b", "edited": "e"},
           "corpus": {"source": str(corpus)}, "harvest": {"layer": 1}}
    objects = {"base": object(), "edited": object()}
    run_pipeline(RunConfig.from_dict(cfg), stages, models=objects, progress=False)
    assert [m.stage for m in read_stage_markers(tmp_path / "run")] == ["explain", "predict"]

    cfg["explain"] = {"n_terms": 3}
    with pytest.raises(RuntimeError, match="stopped in explain"):
        run_pipeline(RunConfig.from_dict(cfg), stages, models=objects, progress=False)
    assert load_run_config(tmp_path / "run").explain.n_terms == 3
    assert not (tmp_path / "run" / "prediction").exists()
    assert read_stage_markers(tmp_path / "run") == []


def test_a_changed_config_over_a_stage_left_unfinished_says_what_to_do_in_a_run(pair_and_corpus, tmp_path):
    # A harvest that never finished (its store on disk, no marker), then another layer: the harvest refuses
    # the store, and the message says what to do in `mneme run` (not only the function's overwrite=True).
    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth)
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg), "--only", "harvest"])
    assert result.exit_code == 0, result.output
    (tmp_path / "run" / ".stages" / "harvest.json").unlink()
    cfg["harvest"]["layer"] = 0
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "b.yaml", cfg), "--only", "harvest"])
    assert result.exit_code != 0 and "different setup" in result.output
    assert f"In `mneme run`: delete {tmp_path / 'run' / 'activations'}" in result.output.replace("\n", "")
    shutil.rmtree(tmp_path / "run" / "activations")  # as the message says
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "b.yaml", cfg), "--only", "harvest"])
    assert result.exit_code == 0, result.output


def test_the_run_remedies_go_to_foreign_outputs_and_damaged_files_only(tmp_path):
    """`mneme run` adds its remedy to a ForeignOutputError by its type, whatever its text; to a damaged file's
    CheckpointError (a truncated shard said "harvest it again (--overwrite)", which `mneme run` cannot do,
    and every rerun failed the same way) the stage folder to delete; and to no other error."""
    from mneme_plugin.errors import CheckpointError, ConfigError, ForeignOutputError
    from mneme_plugin.pipeline import run_pipeline
    from mneme_plugin.pipeline.stage import Stage

    def fail(error):
        def run(ctx):
            raise error
        return run

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text\n")
    cfg = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "models": {"base": "b", "edited": "e"},
                               "corpus": {"source": str(corpus)}, "harvest": {"layer": 1}})
    objects = {"base": object(), "edited": object()}
    other_work = tmp_path / "elsewhere"
    stages = [Stage("train", ("training",), lambda l: l.crosscoder_run,
                    fail(ForeignOutputError(f"{other_work} holds other work.", other_work)))]
    with pytest.raises(ForeignOutputError) as refused:
        run_pipeline(cfg, stages, models=objects, progress=False)
    assert str(refused.value) == (f"{other_work} holds other work. In `mneme run`: delete {other_work} to start "
                                  "the train stage over, or give this run another run_dir.")
    assert refused.value.folder == other_work
    corrupt = CheckpointError("run/crosscoder_run/metrics.json is corrupt; delete it and train again (--no-resume).")
    stages = [Stage("train", ("training",), lambda l: l.crosscoder_run, fail(corrupt))]
    with pytest.raises(CheckpointError) as raised:
        run_pipeline(cfg, stages, models=objects, progress=False)
    assert str(raised.value) == (f"{corrupt} In `mneme run`: delete the run directory's folder of the stage that "
                                 "wrote the damaged file (e.g. activations/ for a store's shard) and run again: the "
                                 "run redoes that stage and the ones after it.")
    assert raised.value.__cause__ is corrupt
    refused_config = ConfigError("steps must be > 0.")
    stages = [Stage("train", ("training",), lambda l: l.crosscoder_run, fail(refused_config))]
    with pytest.raises(ConfigError) as raised:
        run_pipeline(cfg, stages, models=objects, progress=False)
    assert raised.value is refused_config


def test_redone_explain_and_map_stages_take_the_llm_answers_from_the_run_cache(pair_and_corpus, tmp_path):
    """The LLM answers are kept in the run's cache/, not in the stage folders a redone stage loses: a
    change upstream of explain that leaves the prompts as they were pays for no call again; another
    model's answers are asked for, and only those."""
    from mneme_plugin.interpret.explain import load_explanations
    from mneme_plugin.interpret.mapping import load_mapping
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline import plan, run_pipeline
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    server = FakeLLM()
    try:
        client = {"kind": "openai", "model": "fake-model", "base_url": server.url, "api_key": None, "timeout": 10.0}
        cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
        cfg["explain"] = {"explainer": "default", "min_examples": 1, "n_examples": 4, "client": client}
        cfg["map"] = {"taxonomies": ["organism"], "method": "llm", "labeler": "llm", "client": client}
        only = ["harvest", "train", "attribute", "collect", "explain", "map"]
        layout = RunLayout(tmp_path / "run")
        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        explained, mapped = load_explanations(layout.explanations), load_mapping(layout.mapping)
        n_explained = len(explained)
        calls = len(server.requests)
        # Per latent an explanation; a label and a ranking per distinct explanation (identical prompts share).
        assert n_explained > 1 and calls == n_explained + 2 * explained["explanation"].nunique()
        for stage, folder in (("explain", layout.explanations), ("map", layout.mapping)):
            assert any((layout.cache(stage) / "llm_cache").rglob("*.json")) and not (folder / "llm_cache").exists()
        info = CliRunner().invoke(main, ["info", str(tmp_path / "run")]).output.replace("\n", " ")
        sizes = {stage: sum(f.stat().st_size for f in layout.cache(stage).rglob("*") if f.is_file())
                 for stage in ("explain", "map")}
        assert (f"cache: {tmp_path / 'run' / 'cache'} (explain {sizes['explain'] / 2**10:.1f} KiB, "
                f"map {sizes['map'] / 2**10:.1f} KiB;") in info

        # Collect's Delphi cache in two files instead of one: collect, explain and map are redone.
        cfg["collect"]["n_splits"] = 2
        statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
        assert all(statuses[name].startswith("rerun") for name in ("collect", "explain", "map"))
        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        assert len(server.requests) == calls
        pd.testing.assert_frame_equal(load_explanations(layout.explanations), explained)
        pd.testing.assert_frame_equal(load_mapping(layout.mapping), mapped)

        # Another explainer model: its answers are asked for; map's prompts (the same explanations) are not.
        cfg["explain"]["client"] = {**client, "model": "other-model"}
        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        assert len(server.requests) == calls + n_explained
        assert {r["model"] for r in server.requests[calls:]} == {"other-model"}
    finally:
        server.close()


def test_a_changed_intervention_measures_the_edited_model_only(pair_and_corpus, tmp_path):
    """A changed intervention redoes the ground-truth stage, whose folder goes; each model's lm-eval
    results stay in the run's cache/ by what they depend on: the base model's are taken from there,
    the new edited model is measured."""
    from mneme_plugin.groundtruth.harness import RESULTS_CACHE, RESULTS_JSON
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline import plan, run_pipeline
    from mneme_plugin.pipeline.stages import STAGES

    base, _, corpus, _ = pair_and_corpus
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_lm_eval_task(tasks, "toy_animals", 8, seed=0)
    texts = synthetic_corpus(32, seed=11)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": texts[2 * i]}, {"role": "assistant", "content": texts[2 * i + 1]}]}
        for i in range(16)])
    cfg = {"run_dir": str(tmp_path / "run"), "models": {"base": str(base), "edited": "intervention"},
           "corpus": {"source": str(corpus)}, "harvest": {"layer": 1},
           "intervention": {"kind": "sft", "settings": {"data": str(chat), "lr": 1e-2, "batch_size": 4,
                                                        "grad_accum": 1, "device": "cpu"}},
           "ground_truth": {"tables": {"toy": {"categories": {"toy_animals": "anatomy"},
                                               "lm_eval": {"tasks": ["toy_animals"], "include_path": [str(tasks)],
                                                           "include_defaults": False, "device": "cpu"}}}}}
    layout = RunLayout(tmp_path / "run")
    only = ["intervention", "ground_truth"]

    def measured():
        """lm-eval's own record of when it ran each model (results taken from the cache keep it)."""
        return {side: json.loads((layout.ground_truth / "toy" / name).read_text())["date"]
                for side, name in RESULTS_JSON.items()}

    run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
    first = measured()
    cfg["intervention"]["settings"]["lr"] = 3e-2
    statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses["intervention"] == "rerun (config changed)" and statuses["ground_truth"].startswith("rerun")
    run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
    now = measured()
    assert now["before"] == first["before"] and now["after"] != first["after"]
    assert len(list((layout.cache("ground_truth") / RESULTS_CACHE).glob("*.json"))) == 3

def test_an_intervention_stage_left_unfinished_resumes_or_says_what_to_do(pair_and_corpus, tmp_path):
    from mneme_plugin.interventions.hf_rmu import rmu_unlearn_hf

    base, _, corpus, truth = pair_and_corpus
    forget = write_jsonl(tmp_path / "forget.jsonl", [{"text": t} for t in synthetic_corpus(40, seed=8)])
    retain = write_jsonl(tmp_path / "retain.jsonl", [{"text": t} for t in synthetic_corpus(40, seed=9)])
    cfg = _config(tmp_path / "run", base, "intervention", corpus, truth)
    settings = {"forget_corpora": [str(forget)], "retain_corpora": [str(retain)], "layer_id": 1, "layer_ids": [0, 1],
                "batch_size": 4, "max_num_batches": 6, "checkpoint_every": 2, "device": "cpu"}
    cfg["intervention"] = {"kind": "rmu", "settings": settings}
    edited_model = tmp_path / "run" / "edited_model"

    def killed_at_3(step, record):
        if step == 3:
            raise RuntimeError("killed")

    # Harvest and training selected before the intervention that writes the edited model they read: refused
    # before any stage (the harvest failed on the missing model folder after starting).
    early = CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg), "--only", "harvest", "--only", "train"])
    assert early.exit_code != 0 and ("--only harvest: it reads what intervention writes, which is not done (run) and "
                                     "not selected: add --only intervention") in early.output, early.output
    assert not (tmp_path / "run").exists()

    # The stage killed after step 3 (its checkpoint after step 2), then its settings changed: refused.
    with pytest.raises(RuntimeError, match="killed"):
        rmu_unlearn_hf(RunConfig.from_dict(cfg).intervention.resolved(str(base)), progress=False,
                       out_dir=edited_model, on_step=killed_at_3)
    changed = {**cfg, "intervention": {"kind": "rmu", "settings": {**settings, "lr": 1e-4}}}
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "b.yaml", changed), "--only", "intervention"])
    assert result.exit_code != 0 and "another config" in result.output and "lr: stored 5e-05 vs now 0.0001" in result.output
    assert f"In `mneme run`: delete {edited_model}" in result.output.replace("\n", "")
    # `mneme info` on the stage's folder says what to do in a run (it named `--no-resume`, an option of `mneme intervene`)
    info = CliRunner().invoke(main, ["info", str(edited_model)])
    assert info.exit_code == 0 and "Unfinished intervention" in info.output, info.output
    assert f"run `mneme run` again (same config) to resume it, or delete {edited_model} to start over" in \
        " ".join(info.output.split()), info.output
    # The same settings again: the stage resumes at step 2 and writes the model over its checkpoints.
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg), "--only", "intervention"])
    assert result.exit_code == 0, result.output
    assert "RMU: resumed from" in result.output and "at step 2 of 6" in result.output
    assert (edited_model / "config.json").is_file() and not (edited_model / "checkpoints").exists()
    assert (tmp_path / "run" / ".stages" / "intervention.json").is_file()


def test_a_changed_intervention_answers_and_judges_with_the_edited_model_only(pair_and_corpus, tmp_path):
    """The judge ground truth: a changed intervention redoes the ground-truth stage, whose folder goes;
    the answers of each model stay in the run's cache/ by what they depend on, and the judge's verdicts
    by their prompt: the base model is neither asked nor judged again, the new edited model is. A
    changed generator setting or question set has both models answer again."""
    from mneme_plugin.groundtruth.judge import ANSWERS_CACHE, ANSWERS_JSONL
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline import plan, run_pipeline
    from mneme_plugin.pipeline.stages import STAGES

    base, _, corpus, _ = pair_and_corpus
    texts = synthetic_corpus(32, seed=11)
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": texts[2 * i]}, {"role": "assistant", "content": texts[2 * i + 1]}]}
        for i in range(16)])
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question": texts[i], "category": f"c{i % 2}"}
                                                           for i in range(4)])
    judge = FakeLLM()
    judge.reply = lambda body: {"message": {"role": "assistant", "content": "#thereason: r\n#thescore: 1"}}
    try:
        cfg = {"run_dir": str(tmp_path / "run"), "models": {"base": str(base), "edited": "intervention"},
               "corpus": {"source": str(corpus)}, "harvest": {"layer": 1},
               "intervention": {"kind": "sft", "settings": {"data": str(chat), "lr": 1e-2, "batch_size": 4,
                                                            "grad_accum": 1, "device": "cpu"}},
               "ground_truth": {"tables": {"harm": {"judge": {
                   "questions": str(questions), "scoring": "harmfulness", "samples_per_question": 2,
                   "generator": {"kind": "hf", "max_new_tokens": 6, "device": "cpu", "batch_size": 4},
                   "judge": {"kind": "openai", "model": "judge", "base_url": judge.url, "api_key": None,
                             "max_retries": 1, "backoff_base": 0.01, "timeout": 10.0}}}}}}
        layout = RunLayout(tmp_path / "run")
        only = ["intervention", "ground_truth"]

        def generated():
            """Answers generated per file of the cache (each is appended once, as it comes)."""
            return {p.name: len(p.read_text().splitlines())
                    for p in (layout.cache("ground_truth") / ANSWERS_CACHE).glob("*.jsonl")}

        def answers(side):
            return [json.loads(line)["answer"]
                    for line in (layout.ground_truth / "harm" / ANSWERS_JSONL[side]).read_text().splitlines()]

        def judged(requests):
            return {r["messages"][-1]["content"].split('Model Response: "', 1)[1].split('"\n', 1)[0]
                    for r in requests}

        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        first, before, calls = generated(), answers("before"), len(judge.requests)
        assert sorted(first.values()) == [8, 8] and judged(judge.requests) == set(before + answers("after"))

        cfg["intervention"]["settings"]["lr"] = 3e-2
        statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
        assert statuses["intervention"] == "rerun (config changed)" and statuses["ground_truth"].startswith("rerun")
        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        now, after = generated(), answers("after")
        # The first files as they were (no base answer appended), one new file: the new edited model's.
        assert {k: now[k] for k in first} == first and len(now) == 3 and sum(now.values()) == 24
        assert answers("before") == before
        new_calls = judge.requests[calls:]
        assert set(before) - set(after)  # answers only the base model gave: not judged again
        assert new_calls and judged(new_calls) <= set(after) and not judged(new_calls) & (set(before) - set(after))

        # Another generator setting, then another question set: both models answer again.
        cfg["ground_truth"]["tables"]["harm"]["judge"]["generator"]["max_new_tokens"] = 5
        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        assert len(generated()) == 5 and sum(generated().values()) == 40
        more = write_jsonl(tmp_path / "more.jsonl", [{"question": texts[i], "category": f"c{i % 2}"} for i in range(6)])
        cfg["ground_truth"]["tables"]["harm"]["judge"]["questions"] = str(more)
        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        assert len(generated()) == 7 and sum(generated().values()) == 40 + 2 * 12
        # The same questions file rewritten in place: the stage is redone (the marker holds its content).
        assert {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}["ground_truth"] == "skip (done)"
        write_jsonl(more, [{"question": texts[i], "category": f"c{i % 2}"} for i in range(6, 10)])
        statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
        assert statuses["ground_truth"] == "rerun (model or input files changed)"
        run_pipeline(RunConfig.from_dict(cfg), only=only, progress=False)
        assert len(generated()) == 9 and sum(generated().values()) == 64 + 2 * 8
    finally:
        judge.close()


def test_lm_eval_task_folders_are_inputs_of_the_ground_truth_stage(tmp_path):
    """A task YAML edited in place in an lm-eval include_path changes the ground-truth stage's input
    digests (so its marker no longer matches); what importing the tasks writes (__pycache__) does not."""
    from mneme_plugin.pipeline.stages import STAGES, input_digests

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: t\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text\n")
    cfg = RunConfig.from_dict({
        "run_dir": str(tmp_path / "run"), "models": {"base": "b", "edited": "e"}, "corpus": {"source": str(corpus)},
        "harvest": {"layer": 1},
        "ground_truth": {"tables": {"bench": {"lm_eval": {"tasks": ["t"], "include_path": [str(tasks)]}}}}})
    stage = next(s for s in STAGES if s.name == "ground_truth")
    first = input_digests(stage, cfg, None)
    assert set(first) == {f"folder:{tasks}"}
    (tasks / "__pycache__").mkdir()
    (tasks / "__pycache__" / "utils.cpython-312.pyc").write_bytes(b"\0")
    assert input_digests(stage, cfg, None) == first
    (tasks / "t.yaml").write_text("task: t\nnum_fewshot: 5\n")
    assert input_digests(stage, cfg, None) != first


def test_intervention_data_files_are_inputs_of_the_intervention_stage(tmp_path):
    """SFT data and RMU corpora edited in place change the intervention stage's input digests (a
    finished edit is then redone); hub data sets have none."""
    from mneme_plugin.pipeline.stages import STAGES, input_digests

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text\n")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    stage = next(s for s in STAGES if s.name == "intervention")

    def digests(intervention):
        cfg = RunConfig.from_dict({"run_dir": str(tmp_path / "run"), "models": {"base": "b", "edited": "intervention"},
                                   "corpus": {"source": str(corpus)}, "harvest": {"layer": 1},
                                   "intervention": intervention})
        return input_digests(stage, cfg, None)

    sft = {"kind": "sft", "settings": {"data": str(chat)}}
    first = digests(sft)
    assert set(first) == {f"data:{chat}"}
    write_jsonl(chat, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}]}])
    assert digests(sft)[f"data:{chat}"] != first[f"data:{chat}"]
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"text": "secret"}\n')
    rmu = {"kind": "rmu", "settings": {"forget_corpora": [str(forget)], "retain_corpora": ["hf:wikitext"]}}
    assert set(digests(rmu)) == {f"data:{forget}"}


def test_a_corpus_rewritten_in_place_is_read_again(pair_and_corpus, tmp_path):
    """The fingerprint names the corpus by its path; the markers of the stages that read it also
    record its content, so a file rewritten in place redoes them and every stage after them."""
    import shutil

    from mneme_plugin.activations.manifest import read_manifest
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    own = tmp_path / "corpus.jsonl"
    shutil.copy(corpus, own)
    cfg = _config(tmp_path / "run", base, edited, own, truth, steps=30)
    path = _write(tmp_path, "a.yaml", cfg)
    assert CliRunner().invoke(main, ["run", path, "--only", "harvest", "--only", "train", "--only", "attribute"]).exit_code == 0
    tokens = read_manifest(tmp_path / "run" / "activations")["n_tokens"]
    statuses = lambda: {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses()["harvest"] == "skip (done)" and statuses()["attribute"] == "skip (done)"
    marker = json.loads((tmp_path / "run" / ".stages" / "harvest.json").read_text())
    assert "corpus_digest" in marker and "corpus_digest" not in json.loads(
        (tmp_path / "run" / ".stages" / "train.json").read_text())  # training read the store, not the corpus
    # The same file name, half the documents.
    lines = own.read_text().splitlines()
    own.write_text("\n".join(lines[: len(lines) // 2]))
    now = statuses()
    assert now["harvest"] == "rerun (corpus changed)"
    assert now["train"] == now["attribute"] == "rerun (input redone)"
    assert now["collect"] == "run"  # never ran: nothing to redo
    assert CliRunner().invoke(main, ["run", path, "--only", "harvest", "--only", "train", "--only", "attribute"]).exit_code == 0
    assert 0 < read_manifest(tmp_path / "run" / "activations")["n_tokens"] < tokens
    assert statuses()["harvest"] == "skip (done)" and statuses()["attribute"] == "skip (done)"
    # Markers written before content digests existed are not second-guessed; nor is a corpus that is gone.
    del marker["corpus_digest"]
    marker["fingerprint"] = json.loads((tmp_path / "run" / ".stages" / "harvest.json").read_text())["fingerprint"]
    (tmp_path / "run" / ".stages" / "harvest.json").write_text(json.dumps(marker))
    own.write_text("\n".join(lines))
    assert statuses()["harvest"] == "skip (done)"
    own.unlink()
    assert statuses()["harvest"] == "skip (done)"


def _reruns_on_new_edited_rows(statuses, path, only, run_dir, first) -> None:
    """The edited model's weights changed: the plan redoes the harvest and what follows, and the rerun
    stores the base model's rows as before and new rows of the edited one."""
    from mneme_plugin.activations.store import ActivationStore

    now = statuses()
    assert now["harvest"] == "rerun (model or input files changed)"
    assert now["train"] == now["attribute"] == "rerun (input redone)"
    assert CliRunner().invoke(main, ["run", path, *only]).exit_code == 0
    again = ActivationStore(run_dir / "activations").all_activations(max_rows=64)
    assert torch.allclose(again[:, 0], first[:, 0]) and not torch.allclose(again[:, 1], first[:, 1])


def test_a_model_folder_saved_over_in_place_is_read_again(pair_and_corpus, tmp_path):
    """The fingerprint names a model by its spec; the markers of the stages that read a local model
    folder also record its files' sizes and times, so new weights saved over it redo those stages
    (and those after them), while rereading the same folder redoes nothing."""
    import shutil

    from mneme_plugin.activations.store import ActivationStore
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    own = tmp_path / "edited"
    shutil.copytree(edited, own)
    cfg = _config(tmp_path / "run", base, own, corpus, truth, steps=30)
    path = _write(tmp_path, "a.yaml", cfg)
    only = ["--only", "harvest", "--only", "train", "--only", "attribute"]
    assert CliRunner().invoke(main, ["run", path, *only]).exit_code == 0
    statuses = lambda: {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses()["harvest"] == "skip (done)" and statuses()["attribute"] == "skip (done)"
    harvest_marker = json.loads((tmp_path / "run" / ".stages" / "harvest.json").read_text())
    assert set(harvest_marker["input_digests"]) == {"model:base", "model:edited"}
    assert "input_digests" not in json.loads((tmp_path / "run" / ".stages" / "train.json").read_text())
    first = ActivationStore(tmp_path / "run" / "activations").all_activations(max_rows=64)
    # Other weights under the same folder name.
    save_finetuned_llama(base, own, synthetic_corpus(40, seed=11), steps=8, seed=4)
    _reruns_on_new_edited_rows(statuses, path, only, tmp_path / "run", first)
    assert statuses()["harvest"] == "skip (done)" and statuses()["attribute"] == "skip (done)"
    # Markers written before model digests existed are not second-guessed.
    marker = json.loads((tmp_path / "run" / ".stages" / "harvest.json").read_text())
    del marker["input_digests"]
    (tmp_path / "run" / ".stages" / "harvest.json").write_text(json.dumps(marker))
    save_finetuned_llama(base, own, synthetic_corpus(40, seed=12), steps=8, seed=5)
    assert statuses()["harvest"] == "skip (done)"


def test_a_hub_model_whose_cached_commit_moves_is_read_again(pair_and_corpus, tmp_path, hub_cache):
    """A hub id in the local hub cache is recorded by the commit `refs/main` names there: a new commit
    downloaded into the cache redoes the stages that read the model, an unchanged cache redoes nothing."""
    from mneme_plugin.activations.store import ActivationStore
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES
    from tests.helpers import hub_cache_repo

    base, edited, corpus, truth = pair_and_corpus
    hub_cache_repo(hub_cache, "someone/edited-llama", edited, commit="a" * 40)
    cfg = _config(tmp_path / "run", base, "someone/edited-llama", corpus, truth, steps=30)
    path = _write(tmp_path, "a.yaml", cfg)
    only = ["--only", "harvest", "--only", "train", "--only", "attribute"]
    result = CliRunner().invoke(main, ["run", path, *only])
    assert result.exit_code == 0, result.output
    statuses = lambda: {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses()["harvest"] == "skip (done)" and statuses()["attribute"] == "skip (done)"
    marker = json.loads((tmp_path / "run" / ".stages" / "harvest.json").read_text())
    assert marker["input_digests"]["model:edited"] == "hub commit " + "a" * 40
    first = ActivationStore(tmp_path / "run" / "activations").all_activations(max_rows=64)
    # The hub repo moved on and the cache downloaded the new commit: refs/main names another snapshot.
    save_finetuned_llama(base, tmp_path / "newer", synthetic_corpus(40, seed=11), steps=8, seed=4)
    hub_cache_repo(hub_cache, "someone/edited-llama", tmp_path / "newer", commit="b" * 40)
    _reruns_on_new_edited_rows(statuses, path, only, tmp_path / "run", first)
    assert statuses()["harvest"] == "skip (done)"


def test_a_hub_model_a_stage_downloads_is_recorded_by_the_commit_it_got(pair_and_corpus, tmp_path, hub_cache):
    """Planned before the hub id is in the cache (nothing to record), the stage downloads it: its marker
    records the commit it got, so the next new commit redoes it; what the plan digested is kept as planned."""
    from mneme_plugin.pipeline.run import _input_digests_now, _recorded_inputs
    from mneme_plugin.pipeline.stages import STAGES
    from tests.helpers import hub_cache_repo

    base, edited, corpus, truth = pair_and_corpus
    config = RunConfig.from_dict(_config(tmp_path / "run", base, "someone/edited-llama", corpus, truth))
    harvest = next(stage for stage in STAGES if stage.name == "harvest")
    planned = _input_digests_now(config, [harvest])["harvest"]
    assert "model:edited" not in planned and "model:base" in planned
    hub_cache_repo(hub_cache, "someone/edited-llama", edited, commit="c" * 40)  # what the stage downloaded
    assert _recorded_inputs(harvest, config, planned) == {**planned, "model:edited": "hub commit " + "c" * 40}


def test_a_ground_truth_csv_rewritten_in_place_is_evaluated_again(pair_and_corpus, tmp_path):
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES
    from mneme_plugin.sideeffects import load_evaluation

    base, edited, corpus, truth = pair_and_corpus
    own = tmp_path / "truth.csv"
    own.write_text(truth.read_text())
    cfg = _config(tmp_path / "run", base, edited, corpus, own, steps=30)
    path = _write(tmp_path, "a.yaml", cfg)
    assert CliRunner().invoke(main, ["run", path]).exit_code == 0
    assert load_evaluation(tmp_path / "run" / "evaluation").true_set == ["biology"]
    statuses = lambda: {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES)}
    assert statuses()["evaluate"] == "skip (done)"
    # The corrected table under the same name: law degraded too.
    pd.DataFrame({"category": ["biology", "cooking", "law"], "before": [0.9, 0.8, 0.7],
                  "after": [0.5, 0.8, 0.3]}).to_csv(own, index=False)
    now = statuses()
    assert now["evaluate"] == "rerun (model or input files changed)" and now["report"] == "rerun (input redone)"
    assert now["train"] == now["predict"] == "skip (done)"
    assert CliRunner().invoke(main, ["run", path]).exit_code == 0
    assert load_evaluation(tmp_path / "run" / "evaluation").true_set == ["biology", "law"]


def test_dry_run_checks_the_config(pair_and_corpus, tmp_path):
    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "dry", base, edited, corpus, truth)
    cfg["harvest"]["layer"] = 7
    cfg["harvest"]["max_tokens"] = 100_000
    result = CliRunner().invoke(main, ["run", "--dry-run", _write(tmp_path, "dry.yaml", cfg)])
    assert result.exit_code == 1, result.output  # problems found: a failing exit status for scripts
    assert "harvest.layer 7 is out of range: the models have 2 layers" in result.output
    assert "d_model 32" in result.output and "activation store of 100,000 tokens (float32) ~24.4 MiB;" in result.output
    assert "harvest    run" in result.output
    assert not (tmp_path / "dry").exists()
    # The offline explainer and mapper call no LLM (the estimate said they did, whatever the config).
    assert "explain and map run offline (no LLM call)" in result.output
    cfg["explain"] = {"explainer": "default", "client": {"kind": "stub"}}
    llm = CliRunner().invoke(main, ["run", "--dry-run", _write(tmp_path, "llm.yaml", cfg)])
    assert "; explain calls the LLM client once per collected latent" in llm.output, llm.output
    only = CliRunner().invoke(main, ["run", "--dry-run", "--only", "train", _write(tmp_path, "dry.yaml", cfg)])
    assert "train      run" in only.output and "harvest    not selected (--only)" in only.output
    unknown = CliRunner().invoke(main, ["run", "--dry-run", "--only", "trian", _write(tmp_path, "dry.yaml", cfg)])
    assert unknown.exit_code != 0 and "Unknown stage(s) ['trian']" in unknown.output
    cfg["harvest"]["layr"] = 1
    with pytest.raises(ConfigError, match="did you mean 'layer'"):
        RunConfig.from_dict(cfg)
    with pytest.raises(ConfigError, match="Unknown section"):
        RunConfig.from_dict({**_config(tmp_path, base, edited, corpus, truth), "harvset": {}})


def test_remediate_command_retrains_a_hf_model_on_collected_contexts(pair_and_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    cfg["collect"]["classes"] = ["base_only", "suppressed", "amplified", "edited_only", "shared"]
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "r.yaml", cfg)]).exit_code == 0
    # The tiny pair's 30-step crosscoder may classify every latent shared and predict nothing: the
    # section's classes (read from --config) take shared latents too and --target changed ignores the
    # prediction, so the command always has samples to retrain on.
    remediate_cfg = _write(tmp_path, "remediate.yaml",
                           {"remediate": {"classes": ["base_only", "suppressed", "amplified", "edited_only", "shared"],
                                          "batch_size": 2}})
    result = CliRunner().invoke(main, ["remediate", "--run-dir", str(tmp_path / "run"), "--edited", str(edited),
                                       "--out", str(tmp_path / "remediated"), "--steps", "3", "--target", "changed",
                                       "--config", remediate_cfg])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "remediated" / "remediation.csv").exists()  # no evaluator: no scores, no empty table
    from mneme_plugin.interventions.hf_models import load_causal_lm

    retrained, tokenizer = load_causal_lm(str(tmp_path / "remediated" / "model"), device="cpu")  # a model folder whole
    assert tokenizer.get_vocab() == load_causal_lm(str(edited), device="cpu")[1].get_vocab()
    original = AutoModelForCausalLM.from_pretrained(edited)
    changed = [n for (n, p), (_, q) in zip(retrained.named_parameters(), original.named_parameters()) if not torch.equal(p, q)]
    assert changed
    # A model whose tokenizer reads the run's token ids as other words would retrain on other text: refused.
    from tests.helpers import make_tokenizer, save_tiny_llama

    other = save_tiny_llama(tmp_path / "other", make_tokenizer(["zebra quartz violin", "the moon is far"] * 20),
                            n_layers=2, hidden_size=32)
    args = ["--out", str(tmp_path / "again"), "--steps", "1", "--target", "changed", "--config", remediate_cfg]
    refused = CliRunner().invoke(main, ["remediate", "--run-dir", str(tmp_path / "run"), "--edited", str(other), *args])
    assert refused.exit_code != 0 and "has another tokenizer than the run (token id" in refused.output, refused.output
    assert not (tmp_path / "again").exists()
    # The right tokenizer but not the run's edited model: retrained, with a warning naming the run's.
    warned = CliRunner().invoke(main, ["remediate", "--run-dir", str(tmp_path / "run"), "--edited", str(base), *args])
    assert warned.exit_code == 0, warned.output
    assert "found its side effects in" in warned.output and str(edited) in warned.output, warned.output


def test_predict_command_with_and_without_a_control_run(pair_and_corpus, tmp_path):
    base, edited, corpus, truth = pair_and_corpus
    run = tmp_path / "run"
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "r.yaml", _config(run, base, edited, corpus, truth, steps=30))]).exit_code == 0
    # The default rule without a control is the outlier rule, and says so (this used to crash after
    # writing the prediction: the verdict came without the concentration test's p-value).
    alone = CliRunner().invoke(main, ["predict", "--run-dir", str(run), "--rule", "outlier_or_broad"])
    assert alone.exit_code == 0, alone.output
    assert "Change: no control: the outlier rule\n" in alone.output
    assert json.loads((run / "prediction" / "predictions.json").read_text())["tests"]["verdict"] == "no control: the outlier rule"
    # A finished run as the control (here the run itself: an edit no broader than its control).
    for rule in ("outlier_or_broad", "outlier_plus_broad"):
        controlled = CliRunner().invoke(main, ["predict", "--run-dir", str(run), "--rule", rule, "--control-run", str(run)])
        assert controlled.exit_code == 0, controlled.output
        tests = json.loads((run / "prediction" / "predictions.json").read_text())["tests"]
        assert tests["breadth_p"] >= 0.05 and tests["control_changed_latents"] == tests["changed_latents"]
        assert f"concentration p {tests['concentration_p']:.3g}, breadth p {tests['breadth_p']:.3g})" in controlled.output
    # A --config with only a rule keeps the run's other settings (its taxonomy, organism, not MMLU's).
    rule_only = tmp_path / "rule.yaml"
    rule_only.write_text("predict: {rule: outlier}\n")
    own = CliRunner().invoke(main, ["predict", "--run-dir", str(run), "--config", str(rule_only)])
    assert own.exit_code == 0, own.output
    scored = json.loads((run / "prediction" / "predictions.json").read_text())
    assert scored["config"]["rule"] == "outlier" and "clinical_knowledge" not in own.output
    from mneme_plugin.sideeffects import load_prediction
    assert set(load_prediction(run / "prediction").scores["category"]) == {
        "biology", "chemistry", "medicine", "law", "history", "security", "cooking", "sports"}
    # --side: the scores are those of the side's latents alone (the API on the same tables is the reference)
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret import load_taxonomy
    from mneme_plugin.interpret.mapping import category_links, load_mapping
    from mneme_plugin.sideeffects import PredictConfig, predict as predict_api

    sided = CliRunner().invoke(main, ["predict", "--run-dir", str(run), "--rule", "top_k", "-k", "2", "--side", "amplified"])
    assert sided.exit_code == 0, sided.output
    got = load_prediction(run / "prediction")
    assert got.config.side == "amplified"
    links = category_links(load_mapping(run / "mapping"), "organism")
    want = predict_api(load_attribution(run / "attribution").table, links,
                       load_taxonomy("organism").ids(), PredictConfig(rule="top_k", k=2, side="amplified"))
    assert got.predicted == want.predicted
    assert dict(zip(got.scores["category"], got.scores["score"])) == dict(zip(want.scores["category"], want.scores["score"]))
    refused = CliRunner().invoke(main, ["predict", "--run-dir", str(run), "--side", "weakened"])
    assert refused.exit_code != 0 and "'weakened' is not one of 'both', 'suppressed', 'amplified'" in refused.output
    # A run mapped to a second taxonomy it does not predict for: predicting over that one goes to
    # prediction/<taxonomy>/ and leaves the run's own prediction (the one its evaluation reads) alone.
    two = tmp_path / "two"
    cfg2 = _config(two, base, edited, corpus, truth, steps=30)
    cfg2["map"]["taxonomies"] = ["organism", "mmlu"]
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "two.yaml", cfg2)]).exit_code == 0
    own = (two / "prediction" / "predictions.json").read_text()
    again = CliRunner().invoke(main, ["predict", "--run-dir", str(two), "--taxonomy", "mmlu", "--rule", "outlier"])
    assert again.exit_code == 0, again.output
    assert json.loads((two / "prediction" / "mmlu" / "predictions.json").read_text())["config"]["rule"] == "outlier"
    assert (two / "prediction" / "predictions.json").read_text() == own
    # A taxonomy the run never mapped to is refused, and the prediction is left as it was.
    before = (run / "prediction" / "predictions.json").read_text()
    other = CliRunner().invoke(main, ["predict", "--run-dir", str(run), "--taxonomy", "mmlu"])
    assert other.exit_code != 0 and "not mapped to taxonomy 'mmlu' (mapped: ['organism'])" in other.output
    assert (run / "prediction" / "predictions.json").read_text() == before


def test_a_moved_run_directory_reports_describes_and_resumes(pair_and_corpus, tmp_path):
    import shutil

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "first", base, edited, corpus, truth, steps=30)
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg)]).exit_code == 0
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "first"), moved)
    (moved / "report.html").unlink()
    result = CliRunner().invoke(main, ["report", "--run-dir", str(moved)])
    assert result.exit_code == 0, result.output
    page = (moved / "report.html").read_text()
    assert "Metrics (paper Table 1)" in page and "unlearning of biology and genes" in page
    summary = CliRunner().invoke(main, ["info", str(moved)])
    assert summary.exit_code == 0 and "stage report" in summary.output and "MNEME   Acc" in summary.output
    # The same config pointed at the new place finds every stage done.
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict({**cfg, "run_dir": str(moved)}), STAGES)}
    assert set(statuses.values()) == {"skip (done)"}, statuses


def test_runtime_only_edits_keep_finished_work(pair_and_corpus, tmp_path):
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg)]).exit_code == 0
    for section, key, value in (("harvest", "device", "cpu:0"), ("harvest", "batch_size", 3),
                                ("training", "checkpoint_every", 7), ("attribution", "batch_size", 64)):
        edited_cfg = json.loads(json.dumps(cfg))
        edited_cfg[section][key] = value
        statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict(edited_cfg), STAGES)}
        assert set(statuses.values()) == {"skip (done)"}, (section, key, statuses)
    edited_cfg = json.loads(json.dumps(cfg))
    edited_cfg["harvest"]["context_length"] = 16  # changes what is stored: everything is redone
    statuses = {s.name: st for s, _, st in plan(RunConfig.from_dict(edited_cfg), STAGES)}
    assert statuses["harvest"].startswith("rerun") and statuses["train"].startswith("rerun")


def test_markers_written_before_runtime_fields_still_count(pair_and_corpus, tmp_path):
    """Stage markers of the earlier format (no version; fingerprint of every field) are honoured."""
    import hashlib

    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    assert CliRunner().invoke(main, ["run", "--only", "harvest", _write(tmp_path, "a.yaml", cfg)]).exit_code == 0
    run_config = RunConfig.from_dict(cfg)
    # The earlier formula, written out independently: sha256 of the stage's full sections.
    payload = {name: getattr(run_config, name).to_dict() for name in ("models", "corpus", "harvest")}
    text = json.dumps({"stage": "harvest", "config": payload, "upstream": ""}, sort_keys=True, default=str)
    old = {"stage": "harvest", "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16], "seconds": 1.0}
    (tmp_path / "run" / ".stages" / "harvest.json").write_text(json.dumps(old))
    statuses = {s.name: st for s, _, st in plan(run_config, STAGES)}
    assert statuses["harvest"] == "skip (done)" and statuses["train"] == "run"
    old["fingerprint"] = "0" * 16
    (tmp_path / "run" / ".stages" / "harvest.json").write_text(json.dumps(old))
    assert {s.name: st for s, _, st in plan(run_config, STAGES)}["harvest"].startswith("rerun")


def _fingerprint_config(run_dir, stream=False) -> dict:
    """A config whose stages are fingerprinted from strings alone (no model folder or corpus file to digest)."""
    cfg = {"run_dir": str(run_dir), "models": {"base": "b", "edited": "e", "intervention": "unlearning of biology"},
           "corpus": {"source": "hf:c"}, "harvest": {"layer": 1, "max_tokens": 100000},
           "map": {"taxonomies": ["organism"]}, "predict": {"rule": "top_k", "k": 2},
           "ground_truth": {"scores_csv": "truth.csv"}}
    if stream:
        cfg["training"] = {"stream": True}
    return cfg


def _mark_done(cfg: dict, fingerprints: dict[str, str] | None = None, version: int | None = None) -> None:
    """Markers (and output folders) of a finished run of ``cfg``: its plan's fingerprints, or ``fingerprints``."""
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.run import MARKER_VERSION
    from mneme_plugin.pipeline.stages import STAGES

    config = RunConfig.from_dict(cfg)
    config.layout.stages.mkdir(parents=True, exist_ok=True)
    for stage, fingerprint, status in plan(config, STAGES, inputs={}):
        if status == "disabled":
            continue
        out = stage.outputs(config.layout)
        out.mkdir(parents=True, exist_ok=True) if stage.name != "report" else out.write_text("report")
        config.layout.stage_marker(stage.name).write_text(json.dumps(
            {"stage": stage.name, "fingerprint": (fingerprints or {}).get(stage.name, fingerprint), "seconds": 1.0,
             "version": version or MARKER_VERSION}))


def _statuses(cfg: dict) -> dict[str, str]:
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES

    return {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES, inputs={}) if st != "disabled"}


# What `mneme run` wrote into the (version 2) markers of `_fingerprint_config` before marker version 3, stored and
# streamed, with every taxonomy digested as "taxonomy": computed by that code. Such finished runs stay done.
VERSION_2_FINGERPRINTS = {
    False: {"harvest": "a7da58fcf266bd7b", "train": "1c7c1115e09b8248", "attribute": "bee4e141a1f76aba",
            "collect": "ffca8f96d9e9d016", "explain": "5cc79d882c38356a", "map": "81d37733da823e41",
            "predict": "6995033ab45e7045", "evaluate": "be74dc87f868fc15", "report": "1e1ec2d001c5023e"},
    True: {"train": "15c1d3721d8c28d8", "attribute": "bc25667de3d40fb7", "collect": "349c4e4d0321ce66",
           "explain": "af9acde6a0e56ce9", "map": "06d29e30efe1e289", "predict": "48497278641eedf6",
           "evaluate": "7c80d773f2cdf43d", "report": "07afbc3fc448f5bf"},
}


@pytest.mark.parametrize("stream", [False, True])
def test_a_run_finished_with_version_2_markers_stays_done(tmp_path, monkeypatch, stream):
    """Marker version 3 fingerprints the models by name (not the naive baseline's description) and, streaming,
    the batch sizes that decide the stream's rows: runs finished before are not all redone for it."""
    import mneme_plugin.interpret.taxonomy as taxonomy

    monkeypatch.setattr(taxonomy, "taxonomy_digest", lambda t: "taxonomy")
    cfg = _fingerprint_config(tmp_path / "run", stream)
    _mark_done(cfg, VERSION_2_FINGERPRINTS[stream], version=2)
    assert set(_statuses(cfg).values()) == {"skip (done)"}, _statuses(cfg)
    cfg["harvest"]["layer"] = 0  # and they are still compared: a real change redoes them
    assert set(_statuses(cfg).values()) == {"rerun (config changed)"}


@pytest.mark.parametrize("stream", [False, True])
def test_the_naive_baselines_description_redoes_only_the_evaluation(tmp_path, stream):
    """`models.intervention` is read by evaluate's naive baseline alone; the harvest fingerprinted the whole
    models section, so editing the description redid the harvest, the training and every stage after them."""
    cfg = _fingerprint_config(tmp_path / "run", stream)
    _mark_done(cfg)
    cfg["models"]["intervention"] = "RMU unlearning of biology"
    statuses = _statuses(cfg)
    assert statuses.pop("evaluate").startswith("rerun") and statuses.pop("report").startswith("rerun")
    assert set(statuses.values()) == {"skip (done)"}, statuses
    cfg["models"]["edited"] = "e2"  # the models themselves still count
    assert _statuses(cfg)["train"] == "rerun (config changed)"


def test_streaming_the_batch_sizes_that_decide_the_stream_are_fingerprinted(tmp_path):
    """A stream's batches depend on harvest.batch_size (its shuffle buffer fills a forward batch at a time)
    and attribution's rows on attribution.batch_size (its last partial batch is dropped, its buffer is two
    batches): runtime fields for a store, results when streaming."""
    for stream, section, first in ((True, "harvest", "train"), (True, "attribution", "attribute"),
                                   (False, "harvest", None), (False, "attribution", None)):
        cfg = _fingerprint_config(tmp_path / f"{section}-{stream}", stream)
        _mark_done(cfg)
        cfg.setdefault(section, {})["batch_size"] = 3
        statuses = _statuses(cfg)
        names = list(statuses)
        redone = set(names[names.index(first):]) if first else set()
        assert {name for name, st in statuses.items() if st != "skip (done)"} == redone, (section, stream, statuses)


def test_a_ground_truth_table_of_another_taxonomy_redoes_the_prediction(tmp_path):
    """Predict predicts for `RunConfig.taxonomies()`, the map section's first and the ground-truth tables' own,
    each into its folder: a table adding a taxonomy left predict done, and evaluate failed reading a missing
    prediction folder. A run predicting for the map section's first alone keeps its fingerprint."""
    cfg = _fingerprint_config(tmp_path / "run")
    cfg["map"]["taxonomies"] = ["organism", "organism_behaviour"]
    cfg["ground_truth"] = {"tables": {"organism": {"scores_csv": "truth.csv"}}}
    _mark_done(cfg)
    cfg["ground_truth"]["tables"]["behaviour"] = {"scores_csv": "behaviour.csv", "taxonomy": "organism_behaviour"}
    statuses = _statuses(cfg)
    assert statuses["map"] == "skip (done)" and statuses["predict"] == "rerun (config changed)", statuses


def test_an_embedding_model_saved_over_in_place_remaps(tmp_path):
    """The map stage's `embedding_model` folder was named by its path alone: a model saved over it in place left
    the old mapping done. Its marker now records the folder's metadata, as for the models; a lexical map records none."""
    from mneme_plugin.pipeline import plan
    from mneme_plugin.pipeline.stages import STAGES, input_digests

    model = tmp_path / "minilm"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    cfg = _fingerprint_config(tmp_path / "run")
    mapping = next(s for s in STAGES if s.name == "map")
    assert input_digests(mapping, RunConfig.from_dict(cfg), None) == {}
    cfg["map"] = {"taxonomies": ["organism"], "method": "embedding", "embedding_model": str(model)}
    recorded = input_digests(mapping, RunConfig.from_dict(cfg), None)
    assert set(recorded) == {"model:embedding"}
    _mark_done(cfg)
    marker = tmp_path / "run" / ".stages" / "map.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "input_digests": recorded}))
    statuses = lambda: {s.name: st for s, _, st in plan(RunConfig.from_dict(cfg), STAGES) if st != "disabled"}
    assert set(statuses().values()) == {"skip (done)"}
    (model / "model.safetensors").write_bytes(b"other weights")
    now = statuses()
    assert now["explain"] == "skip (done)" and now["map"] == "rerun (model or input files changed)"
    assert now["predict"] == "rerun (input redone)"


def test_a_run_checks_its_whole_config_before_the_first_stage(pair_and_corpus, tmp_path):
    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    cfg["ground_truth"]["scores_csv"] = str(tmp_path / "missing.csv")
    cfg["map"]["taxonomies"] = ["no_such_taxonomy"]
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "missing.csv does not exist" in result.output and "no_such_taxonomy" in result.output
    assert not (tmp_path / "run" / "activations").exists()
    dry = CliRunner().invoke(main, ["run", "--dry-run", _write(tmp_path, "a.yaml", cfg)])
    assert dry.exit_code == 1 and "missing.csv does not exist" in dry.output


def test_a_run_refuses_a_hub_id_it_can_neither_find_nor_download_before_the_first_stage(pair_and_corpus, tmp_path,
                                                                                      hub_cache):
    """A mistyped hub id, offline and not in the local hub cache: the run stops before any stage, naming
    the id and what to do, and keeps the finished stages of the previous config."""
    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=30)
    assert CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg), "--only", "harvest"]).exit_code == 0
    cfg["models"]["edited"] = "someone/edtied-llama"
    result = CliRunner().invoke(main, ["run", _write(tmp_path, "a.yaml", cfg)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "models.edited: the hub model someone/edtied-llama is neither a local model folder nor in the local " \
           "Hugging Face cache" in " ".join(result.output.split())
    assert "HF_HUB_OFFLINE is set" in result.output and "check the spelling" in result.output
    assert (tmp_path / "run" / "activations" / "manifest.json").is_file()  # the previous config's harvest is kept


def test_report_refuses_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(main, ["report", "--run-dir", str(tmp_path)])
    assert result.exit_code != 0 and "is not a MNEME run directory" in result.output
    assert not (tmp_path / "report.html").exists()


@pytest.mark.slow  # two end-to-end runs: minutes on 2 cores
def test_streaming_run_writes_no_store_and_matches_the_stored_run(pair_and_corpus, tmp_path):
    base, edited, corpus, truth = pair_and_corpus
    stored = _config(tmp_path / "stored", base, edited, corpus, truth, steps=40)
    stored["harvest"]["max_tokens"] = 8000  # one streamed pass covers 40 steps of 128 rows
    streamed = json.loads(json.dumps(stored))
    streamed["run_dir"] = str(tmp_path / "streamed")
    # A buffer larger than the harvest: the stream yields the same rows, in its own shuffled order.
    streamed["training"].update(stream=True, shuffle_buffer_rows=1 << 16)
    for cfg, name in ((stored, "stored.yaml"), (streamed, "streamed.yaml")):
        result = CliRunner().invoke(main, ["run", _write(tmp_path, name, cfg)])
        assert result.exit_code == 0, result.output
    assert not (tmp_path / "streamed" / "activations").exists()
    assert (tmp_path / "stored" / "activations").is_dir()
    a = pd.read_parquet(tmp_path / "stored" / "attribution" / "attribution.parquet")
    b = pd.read_parquet(tmp_path / "streamed" / "attribution" / "attribution.parquet")
    # Same data, another row order: close crosscoders; same latents alive and a similar split of classes.
    ev = [json.loads((tmp_path / d / "crosscoder_run" / "metrics.json").read_text()) for d in ("stored", "streamed")]
    for key in ev[0]:
        if key.startswith("explained_variance"):
            assert abs(ev[0][key] - ev[1][key]) < 0.1, (key, ev)
    assert len(a) == len(b)
    shared = lambda t: (t["latent_class"] == "shared").mean()  # noqa: E731
    assert abs(shared(a) - shared(b)) < 0.25
    assert (tmp_path / "streamed" / "report.html").is_file()


@pytest.mark.slow  # a 1-process and a 2-rank end-to-end run: minutes on 2 cores
def test_a_streamed_run_on_two_gloo_ranks_gives_the_one_process_run(pair_and_corpus, tmp_path):
    """`mneme run --nproc 2`: both ranks train on their shares of the one-process stream, rank 0 alone
    runs the stages after training; the outputs are the 1-process run's."""
    base, edited, corpus, truth = pair_and_corpus
    configs = {}
    for name in ("one", "two"):
        cfg = _config(tmp_path / name, base, edited, corpus, truth, steps=40)
        cfg["harvest"]["max_tokens"] = 8000
        cfg["training"].update(stream=True, shuffle_buffer_rows=2048)
        configs[name] = _write(tmp_path, f"{name}.yaml", cfg)
    result = CliRunner().invoke(main, ["run", configs["one"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    two = subprocess.run([sys.executable, "-m", "mneme_plugin.cli", "run", configs["two"], "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Run directory:") == 1  # rank 0 reports, rank 1 left after training

    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    assert not (two_dir / "activations").exists() and (two_dir / "report.html").is_file()
    assert sorted(p.name for p in (two_dir / ".stages").iterdir()) == sorted(p.name for p in (one_dir / ".stages").iterdir())
    assert not list(two_dir.rglob(".mneme.lock"))  # every lock released
    a = BatchTopKCrossCoder.from_pretrained(one_dir / "crosscoder_run" / "crosscoder").state_dict()
    b = BatchTopKCrossCoder.from_pretrained(two_dir / "crosscoder_run" / "crosscoder").state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    attribution = [pd.read_parquet(d / "attribution" / "attribution.parquet") for d in (one_dir, two_dir)]
    pd.testing.assert_frame_equal(attribution[1], attribution[0], check_exact=False, rtol=1e-3, atol=1e-5)


def test_a_waiting_rank_takes_only_this_run_s_marker_or_failure(tmp_path):
    """Ranks other than 0 wait for rank 0's stages by reading the run's files: a marker or a failure
    notice counts only with this run's token (stale ones from an earlier run are ignored)."""
    import threading

    from mneme_plugin.errors import RankFailedError
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline.run import _wait_for_main
    from mneme_plugin.pipeline.stages import STAGES

    layout, stage = RunLayout(tmp_path), STAGES[0]
    layout.stages.mkdir()
    marker, failed = layout.stage_marker(stage.name), layout.stage_failure(stage.name)
    marker.write_text(json.dumps({"fingerprint": "f1", "token": "earlier"}))
    failed.write_text(json.dumps({"token": "earlier", "error": "old"}))
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (_wait_for_main(layout, stage, "f1", "now", 0.01), done.set()))
    waiter.start()
    assert not done.wait(0.3)  # stale files: still waiting
    marker.write_text(json.dumps({"fingerprint": "f1", "token": "now"}))
    waiter.join(10)
    assert done.is_set()
    failed.write_text(json.dumps({"token": "now", "error": "CheckpointError: disk full"}))
    with pytest.raises(RankFailedError, match="disk full"):
        _wait_for_main(layout, stage, "f2", "now", 0.01)


def test_a_waiting_rank_waits_while_rank_0_beats_and_stops_when_it_stops(tmp_path, monkeypatch):
    """Rank 0's heartbeat (``.stages/<stage>.alive``) keeps the waiting ranks waiting through a long
    stage; once it stops changing for HEARTBEAT_TIMEOUT, they raise instead of waiting forever."""
    import threading

    from mneme_plugin.errors import RankFailedError
    from mneme_plugin.layout import RunLayout
    from mneme_plugin.pipeline import run as run_module
    from mneme_plugin.pipeline.stages import STAGES

    monkeypatch.setattr(run_module, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(run_module, "HEARTBEAT_TIMEOUT", 0.5)
    layout, stage = RunLayout(tmp_path), STAGES[0]
    layout.stages.mkdir()
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(
        pytest.raises(RankFailedError, run_module._wait_for_main, layout, stage, "f1", "now", 0.01)))
    with run_module._heartbeat(layout.stage_heartbeat(stage.name), "now"):
        waiter.start()
        time.sleep(1.5)  # three timeouts long: the beats keep it waiting
        assert waiter.is_alive()
    assert not layout.stage_heartbeat(stage.name).exists()  # removed with the stage
    waiter.join(10)
    assert outcome and "gave no sign of life" in str(outcome[0].value) and stage.name in str(outcome[0].value)


@pytest.mark.slow  # a 2-rank end-to-end run: a minute or more on 2 cores
def test_a_stored_run_on_two_gloo_ranks_harvests_shards_and_resumes_in_one_process(pair_and_corpus, tmp_path):
    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "two", base, edited, corpus, truth, steps=40)
    cfg["harvest"]["max_tokens"] = 8000
    path = _write(tmp_path, "two.yaml", cfg)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    two = subprocess.run([sys.executable, "-m", "mneme_plugin.cli", "run", path, "--nproc", "2"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Run directory:") == 1
    run_dir = tmp_path / "two"
    manifest = json.loads((run_dir / "activations" / "manifest.json").read_text())
    assert manifest["complete"] and {s["file"][:7] for s in manifest["shards"]} == {"rank000", "rank001"}
    assert (run_dir / "report.html").is_file() and not list(run_dir.rglob(".mneme.lock"))
    marker_times = {p.name: p.stat().st_mtime_ns for p in (run_dir / ".stages").iterdir()}
    assert "harvest.json" in marker_times and "report.json" in marker_times
    # One process takes over the run: every stage the two ranks finished is skipped.
    result = CliRunner().invoke(main, ["run", path], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / ".stages").iterdir()} == marker_times


@pytest.mark.slow  # two torchrun agents: half a minute on 2 cores
def test_a_rank_on_another_node_stops_when_rank_0_dies_in_a_stage_it_runs_alone(tmp_path):
    """Two nodes (two torchrun agents on this machine): rank 0 is killed in a stage it runs alone. Its agent stops, but torchrun does not stop the other node's rank, which waits for rank
    0's stage marker by reading files: it must give up (no heartbeat from rank 0) with an error naming
    the stage, not wait forever."""
    import socket

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # torchrun's static rendezvous: node 0 holds the store and rank 0, node 1 rank 1.
    def node(i):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}",
                "--master_addr=127.0.0.1", f"--master_port={port}", str(Path(__file__).with_name("rank0_dies_worker.py")),
                str(tmp_path / "run"), str(corpus)]

    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [subprocess.Popen(node(i), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
             for i, log in enumerate(logs)]
    try:
        for node in nodes:
            node.wait(timeout=120)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.terminate()  # torchrun stops its workers on SIGTERM
                try:
                    node.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
    output = "".join(log.read_text() for log in logs)
    assert all(node.returncode != 0 for node in nodes), output[-3000:]
    assert "RankFailedError" in output and "stage alone" in output, output[-3000:]


def test_a_batch_the_ranks_cannot_share_is_refused_before_the_first_stage(pair_and_corpus, tmp_path):
    """`mneme run --nproc 3` with training.batch_size 128: refused before harvest (and any intervention)
    runs, not at the train stage hours later; and before torchrun starts the ranks (each printed the error,
    with torchrun's traceback of 94 lines after it). `--dry-run --nproc 3` says so too (it said runnable)."""
    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "three", base, edited, corpus, truth, steps=40)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    path = _write(tmp_path, "three.yaml", cfg)
    three = subprocess.run([sys.executable, "-m", "mneme_plugin.cli", "run", path, "--nproc", "3"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert three.returncode != 0
    assert three.stderr.count("training.batch_size=128 is the global batch") == 1, three.stderr[-3000:]
    assert "(3)" in three.stderr and "Traceback" not in three.stderr, three.stderr[-3000:]
    assert not (tmp_path / "three" / "activations").exists()  # nothing harvested
    dry = CliRunner().invoke(main, ["run", "--dry-run", "--nproc", "3", path])
    assert dry.exit_code == 1 and "--nproc 3: training.batch_size=128 is the global batch" in dry.output, dry.output
    assert "looks runnable" not in dry.output
    assert CliRunner().invoke(main, ["run", "--dry-run", "--nproc", "2", path]).exit_code == 0
    only = CliRunner().invoke(main, ["run", "--dry-run", "--nproc", "3", "--only", "harvest", path])
    assert only.exit_code == 0, only.output  # the train stage does not run


def _run_rank(rank: int, config_path: str, out: str) -> None:
    from mneme_plugin.errors import MnemeError
    from mneme_plugin.pipeline import run_pipeline

    try:
        run_pipeline(RunConfig.from_yaml(config_path), progress=False)
        outcome = ["ok", ""]
    except MnemeError as err:
        outcome = [type(err).__name__, str(err)]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(outcome))


def test_a_batch_the_ranks_cannot_share_is_refused_before_waiting_for_the_other_ranks(pair_and_corpus, tmp_path,
                                                                                      monkeypatch):
    """Rank 0 of 2 alone (rank 1 never arrives): `mneme run` refuses training.batch_size 127 at once, with
    `mneme train`'s message, not after waiting for the other rank."""
    from tests.helpers import fork_ranks

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth)
    cfg["training"]["batch_size"] = 127
    monkeypatch.setenv("MNEME_DIST_INIT_TIMEOUT", "1")
    fork_ranks(_run_rank, 2, _write(tmp_path, "odd.yaml", cfg), str(tmp_path), started=1)
    kind, message = json.loads((tmp_path / "rank0.json").read_text())
    assert kind == "ConfigError" and "training.batch_size=127 is the global batch" in message, message
    assert "must be a multiple of the number of ranks (2)" in message
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run's first file


def test_a_done_train_stage_is_not_refused_for_a_batch_the_ranks_cannot_share(pair_and_corpus, tmp_path):
    """The batch check before the process group plans from the config and the stage markers alone: a run
    whose train stage is done (resumed with more ranks for its other stages) is not refused for a batch
    it will not split, while the same run with a training change (train to run again) is."""
    from mneme_plugin.pipeline import run_pipeline
    from mneme_plugin.pipeline.run import check_batch_shared
    from mneme_plugin.pipeline.stages import STAGES

    base, edited, corpus, truth = pair_and_corpus
    cfg = _config(tmp_path / "run", base, edited, corpus, truth, steps=20)
    cfg["training"]["checkpoint_every"] = 10
    run_pipeline(RunConfig.from_dict(cfg), only=["harvest", "train"], progress=False)
    check_batch_shared(RunConfig.from_dict(cfg), STAGES, None, 3)  # 128 rows, 3 ranks: train is done
    cfg["training"]["lr"] = 1e-3
    with pytest.raises(ConfigError, match=r"training.batch_size=128 is the global batch.*\(3\)"):
        check_batch_shared(RunConfig.from_dict(cfg), STAGES, None, 3)


def test_a_run_whose_stages_fit_one_by_one_but_not_together_is_refused_before_its_first_stage(pair_and_corpus, tmp_path):
    """Each stage checked only its own writes when it started: a store that fit, harvested for hours, then a
    crosscoder that did not fit beside it. `mneme run` sums what the stages still to run will write per
    disk and refuses before the first one; `--no-disk-check` leaves it to the stages' own checks."""
    from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
    from mneme_plugin.crosscoder.training import disk_need
    from mneme_plugin.errors import DiskSpaceError
    from mneme_plugin.pipeline import run_pipeline
    from mneme_plugin.pipeline.dry_run import disk_shortfalls

    base, edited, corpus, truth = pair_and_corpus
    free = shutil.disk_usage(tmp_path).free
    cfg = _config(tmp_path / "run", base, edited, corpus, truth)
    cfg["training"]["checkpoint_every"] = 0  # the crosscoder's files alone
    d_model = 32
    per_latent = disk_need(CrossCoderConfig(dict_size=1000, k=8).resolve(d_model), TrainingConfig(checkpoint_every=0))[2] / 1000
    cfg["crosscoder"] = {"dict_size": int(0.6 * free / per_latent), "k": 8}  # ~0.6 of the free disk
    cfg["harvest"]["max_tokens"] = int(0.6 * free / (2 * d_model * 4))  # float32 rows of both models: ~0.6 too
    config = RunConfig.from_dict(cfg)
    run_dir = config.layout.root
    for alone in ("harvest", "train"):  # either fits by itself
        assert disk_shortfalls(config, {alone: (run_dir, 0)}) == []
    # What a stage holds already (an interrupted harvest's shards) is not needed again.
    assert len(disk_shortfalls(config, {"harvest": (run_dir, 0), "train": (run_dir, 0)})) == 1
    assert disk_shortfalls(config, {"harvest": (run_dir, int(0.4 * free)), "train": (run_dir, 0)}) == []
    with pytest.raises(DiskSpaceError) as refused:
        run_pipeline(config, progress=False)
    message = str(refused.value)
    assert message.startswith("The run's stages (harvest, train) need ~") and "--no-disk-check" in message
    assert "activation store of" in message and "crosscoder ~" in message and "lower harvest.max_tokens" in message
    assert not run_dir.exists()  # nothing written, not even the config

    # The same refusal from the CLI; with --no-disk-check the harvest's own check passes (its store fits) and
    # the store grows; here a store of twice the free disk, which the harvest stage refuses by itself.
    cfg["harvest"]["max_tokens"] = int(2 * free / (2 * d_model * 4))
    cfg["crosscoder"] = {"expansion_factor": 4, "k": 8}
    path = _write(tmp_path, "run.yaml", cfg)
    result = CliRunner().invoke(main, ["run", path])
    assert result.exit_code != 0 and "The run's stages (harvest, train) need" in result.output, result.output
    # What to change, the largest item's remedy first: the store's here, the crosscoder's after it.
    remedies = " ".join(result.output.split())
    assert remedies.index("lower harvest.max_tokens") < remedies.index("a smaller crosscoder (crosscoder.expansion_factor")
    result = CliRunner().invoke(main, ["run", path, "--no-disk-check"])
    assert result.exit_code != 0 and "The activation store (" in result.output, result.output
    assert "The run's stages" not in result.output and not (run_dir / "activations" / "manifest.json").exists()
