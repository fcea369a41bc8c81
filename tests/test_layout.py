"""The run directory's layout: `mneme clean RUN --cache` deletes the run's cache and nothing else;
`--checkpoints` a finished training's checkpoints."""

import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.errors import CheckpointError, ConfigError, OutputLockedError
from mneme_plugin.interpret.clients import LLM_CACHE_DIR, DiskCache, Response
from mneme_plugin.layout import RunLayout, prune_cache
from tests.helpers import pipeline_inputs


@pytest.fixture(scope="module")
def harvested_run(llama_dir, tmp_path_factory):
    """A `mneme run --only harvest` directory on tiny local models (config, markers, a store)."""
    root = tmp_path_factory.mktemp("layout")
    _, edited, corpus, truth = pipeline_inputs(llama_dir, root, n_documents=40)
    config = {"run_dir": str(root / "run"), "models": {"base": str(llama_dir), "edited": str(edited)},
              "corpus": {"source": str(corpus)}, "harvest": {"layer": 1, "context_length": 32, "dtype": "float32"},
              "ground_truth": {"scores_csv": str(truth)}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["run", str(root / "run.yaml"), "--only", "harvest"])
    assert result.exit_code == 0, result.output
    return root / "run"


def _cached_run(run, tmp_path):
    """A copy of ``run`` with cache entries written the way the stages write them."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    layout = RunLayout(copy)
    for stage, answers in (("explain", 3), ("map", 2)):
        cache = DiskCache(layout.cache(stage) / LLM_CACHE_DIR)
        for i in range(answers):
            cache.put(DiskCache.key("model", [{"role": "user", "content": f"{stage} {i}"}], {}),
                      Response("answer " * 200, None, None, None))
    results = layout.cache("ground_truth") / "lm_eval_results"
    results.mkdir(parents=True)
    (results / "0123abcd.json").write_text(json.dumps({"results": {}}))
    return copy


def _outside_cache(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "cache" not in p.relative_to(run).parts}


def test_clean_cache_lists_with_sizes_then_deletes_only_the_cache(harvested_run, tmp_path):
    """`RUN/cache/` grew without bound (`mneme info` showed its size, nothing pruned it)."""
    run = _cached_run(harvested_run, tmp_path)
    outputs = _outside_cache(run)
    assert b"answer" not in b"".join(outputs.values()) and len(outputs) > 3
    explain = RunLayout(run).cache("explain") / LLM_CACHE_DIR
    explain_bytes = sum(p.stat().st_size for p in explain.rglob("*") if p.is_file())

    dry = CliRunner().invoke(main, ["clean", str(run), "--cache", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines()[0] == "Would delete (dry run):"
    assert f"  cache/explain/{LLM_CACHE_DIR}  3 files, {explain_bytes / 1024:.1f} KiB" in dry.output
    assert "  cache/ground_truth/lm_eval_results  1 file, " in dry.output and "  cache/map/llm_cache  2 files" in dry.output
    assert "in 6 files; the stages' outputs are untouched." in dry.output
    assert explain.is_dir() and len(RunLayout(run).cache_entries()) == 3  # nothing deleted

    only_map = CliRunner().invoke(main, ["clean", str(run), "--cache", "--stage", "map"])
    assert only_map.exit_code == 0 and "Deleted:\n  cache/map/llm_cache  2 files" in only_map.output, only_map.output
    assert not RunLayout(run).cache("map").exists() and explain.is_dir()

    everything = CliRunner().invoke(main, ["clean", str(run), "--cache"])
    assert everything.exit_code == 0 and "Freed " in everything.output, everything.output
    assert not (run / "cache").exists() and _outside_cache(run) == outputs
    again = CliRunner().invoke(main, ["clean", str(run), "--cache"])
    assert again.exit_code == 0 and again.output == f"Nothing cached in {run / 'cache'}.\n"
    assert "cache:" not in CliRunner().invoke(main, ["info", str(run)]).output


def test_clean_refuses_what_is_not_a_run_or_a_stage_cache_and_a_run_in_use(harvested_run, tmp_path, held_lock):
    foreign = tmp_path / "photos"
    (foreign / "cache" / "explain").mkdir(parents=True)
    (foreign / "cache" / "explain" / "holiday.jpg").write_bytes(b"jpeg")
    result = CliRunner().invoke(main, ["clean", str(foreign), "--cache"])
    assert result.exit_code != 0 and f"{foreign} is not a MNEME run directory" in result.output
    assert (foreign / "cache" / "explain" / "holiday.jpg").is_file()
    with pytest.raises(CheckpointError, match="not a MNEME run directory"):
        prune_cache(foreign, dry_run=True)
    assert "It holds" not in result.output

    # The folder above a run (a `mneme demo` case: recipe.yaml beside run/) names the run inside.
    case = tmp_path / "case"
    case.mkdir()
    (case / "recipe.yaml").write_text("run_dir: run\n")
    _cached_run(harvested_run, case)
    with pytest.raises(CheckpointError, match=re.escape(f"It holds a run directory: {case / 'run'}; give that.")):
        prune_cache(case, dry_run=True)

    run = _cached_run(harvested_run, tmp_path)
    with pytest.raises(ConfigError, match=r"\['harvest'\].*ground_truth, explain, map"):
        prune_cache(run, ["harvest"])
    no_flag = CliRunner().invoke(main, ["clean", str(run)])
    assert no_flag.exit_code == 2 and "--cache" in no_flag.output and (run / "cache").is_dir()
    stage_only = CliRunner().invoke(main, ["clean", str(run), "--stage", "explain"])
    assert stage_only.exit_code == 2 and "--stage chooses whose cache --cache deletes: add --cache" in stage_only.output
    assert (run / "cache").is_dir()

    # A run directory another process is writing into (as `mneme run` does) is left alone.
    locked, _ = held_lock
    (locked / "config.yaml").write_text((run / "config.yaml").read_text())
    DiskCache(RunLayout(locked).cache("explain") / LLM_CACHE_DIR).put("ab" * 32, Response("x", None, None, None))
    assert len(prune_cache(locked, dry_run=True)) == 1
    with pytest.raises(OutputLockedError):
        prune_cache(locked)
    assert RunLayout(locked).cache("explain").is_dir()


def test_clean_checkpoints_deletes_a_finished_trainings_checkpoints_and_refuses_an_unfinished_ones(harvested_run, tmp_path):
    """Runs of earlier versions (or with training.keep_finished_checkpoints) keep their training checkpoints
    after the crosscoder is written: 48 GiB at a recipe's size that only resuming reads."""
    import shutil

    from mneme_plugin import ActivationStore, CrossCoderConfig, TrainingConfig, train
    from mneme_plugin.crosscoder import BatchTopKCrossCoder

    run = tmp_path / "run"
    shutil.copytree(harvested_run, run)
    layout = RunLayout(run)
    training = TrainingConfig(steps=30, batch_size=64, checkpoint_every=10, keep_checkpoints=2, eval_rows=64,
                              keep_finished_checkpoints=True)
    train(ActivationStore(layout.activations), layout.crosscoder_run, CrossCoderConfig(expansion_factor=2, k=4),
          training, progress=False)
    checkpoints = layout.crosscoder_run / "checkpoints"
    held = sum(p.stat().st_size for p in checkpoints.rglob("*") if p.is_file())
    crosscoder = BatchTopKCrossCoder.from_pretrained(layout.crosscoder_run / "crosscoder").state_dict()
    assert len(list(checkpoints.iterdir())) == 2 and held > 0

    info = CliRunner().invoke(main, ["info", str(run)]).output
    assert f"  training checkpoints: {checkpoints} ({held / 1024:.1f} KiB) of a finished training" in info, info
    assert f"`mneme clean {run} --checkpoints`" in info

    dry = CliRunner().invoke(main, ["clean", str(run), "--checkpoints", "--dry-run"])
    assert dry.exit_code == 0 and dry.output == f"Would delete (dry run): crosscoder_run/checkpoints  {held / 1024:.1f} KiB\n"
    assert checkpoints.is_dir()

    # Not finished (killed before its metrics were written): the checkpoints are what resumes it.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "crosscoder_run" / "metrics.json").unlink()
    refused = CliRunner().invoke(main, ["clean", str(unfinished), "--checkpoints"])
    assert refused.exit_code != 0 and "has not finished" in refused.output and "resumes it" in refused.output
    assert (unfinished / "crosscoder_run" / "checkpoints").is_dir()

    done = CliRunner().invoke(main, ["clean", str(run), "--checkpoints"])
    assert done.exit_code == 0 and f"freed {held / 1024:.1f} KiB" in done.output, done.output
    assert not checkpoints.exists() and "training checkpoints" not in CliRunner().invoke(main, ["info", str(run)]).output
    after = BatchTopKCrossCoder.from_pretrained(layout.crosscoder_run / "crosscoder").state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in crosscoder.items())
    again = CliRunner().invoke(main, ["clean", str(run), "--checkpoints"])
    assert again.exit_code == 0 and again.output == f"No training checkpoints in {layout.crosscoder_run}.\n"
