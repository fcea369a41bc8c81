"""`mneme intervene` and `mneme groundtruth` through the real CLI."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.groundtruth.table import SCORES_CSV
from mneme_plugin.interventions.hf_models import INTERVENTION_CONFIG, load_training_log
from mneme_plugin.groundtruth.table import read_scores_csv
from tests.helpers import synthetic_corpus, write_jsonl


def test_intervene_sft_and_rmu_write_model_folders(tiny_lm_dirs, rmu_corpora, tmp_path):
    texts = synthetic_corpus(12, seed=4)
    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": texts[i], "input": "", "output": texts[i + 1]}
                                                  for i in range(0, 12, 2)])
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(yaml.safe_dump({"prompt_format": "alpaca", "batch_size": 2, "grad_accum": 1, "lr": 1e-3,
                                   "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}}))
    out = tmp_path / "sft_model"
    runner = CliRunner()
    args = ["intervene", "sft", "--config", str(cfg), "--model", str(tiny_lm_dirs["llama"]), "--data", str(data),
            "--device", "cpu", "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / INTERVENTION_CONFIG).read_text())
    assert saved["kind"] == "SFTConfig" and saved["config"]["lora"]["r"] == 2 and saved["config"]["lr"] == 1e-3
    assert len(load_training_log(out)) == 3 and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    again = runner.invoke(main, args)  # refuses to overwrite before training
    assert again.exit_code != 0 and "already exists" in again.output

    forget, retain, _, _ = rmu_corpora
    rmu_cfg = tmp_path / "rmu.yaml"
    rmu_cfg.write_text(yaml.safe_dump({"layer_id": 1, "layer_ids": [1], "batch_size": 4, "min_chars": 0,
                                       "forget_max_length": 64, "model": str(tiny_lm_dirs["qwen2"])}))
    result = runner.invoke(main, ["intervene", "rmu", "--preset", "llama3_rmu", "--config", str(rmu_cfg),
                                  "--forget", str(forget), "--retain", str(retain), "--max-num-batches", "3",
                                  "--device", "cpu", "--out", str(tmp_path / "rmu_model")])
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "rmu_model" / INTERVENTION_CONFIG).read_text())["config"]
    assert (saved["alpha"], saved["steering_coeff"], saved["max_num_batches"]) == (100.0, 20.0, 3)
    assert saved["forget_corpora"] == [str(forget)]


def test_intervene_resumes_an_interrupted_run_and_refuses_another_config(tiny_lm_dirs, rmu_corpora, tmp_path):
    from mneme_plugin.commands.common import build_config
    from mneme_plugin.interventions.hf_rmu import HFRMUConfig, rmu_unlearn_hf

    forget, retain, _, _ = rmu_corpora
    cfg_file = tmp_path / "rmu.yaml"
    cfg_file.write_text(yaml.safe_dump({"layer_id": 1, "layer_ids": [1], "batch_size": 4, "max_num_batches": 6,
                                        "checkpoint_every": 2, "forget_corpora": [str(forget)],
                                        "retain_corpora": [str(retain)]}))
    model, out = str(tiny_lm_dirs["llama"]), tmp_path / "rmu_model"
    args = ["intervene", "rmu", "--config", str(cfg_file), "--model", model, "--device", "cpu", "--out", str(out)]

    def killed_at_4(step, record):
        if step == 4:
            raise RuntimeError("killed")

    # The command killed after step 4: the same config it builds, its checkpoint at step 4 in --out.
    with pytest.raises(RuntimeError, match="killed"):
        rmu_unlearn_hf(build_config(HFRMUConfig, "rmu", None, str(cfg_file), model=model, device="cpu"), progress=False,
                       out_dir=out, on_step=killed_at_4)
    runner = CliRunner()
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "Unfinished intervention" in info.output and "step 4 of 6" in info.output
    refused = runner.invoke(main, args + ["--max-num-batches", "8"])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "another config" in refused.output and "max_num_batches: stored 6 vs now 8" in refused.output
    assert "--no-resume" in refused.output and (out / "checkpoints").is_dir()
    resumed = runner.invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "at step 4 of 6" in resumed.output
    assert [r["step"] for r in load_training_log(out)] == list(range(6)) and not (out / "checkpoints").exists()
    info = runner.invoke(main, ["info", str(out)])  # the finished folder: an edited model, not a crosscoder
    assert info.exit_code == 0, info.output
    assert f"Edited model {out} (HFRMUConfig)" in info.output and f"from:          {model}" in info.output
    assert "training log:  6 steps" in info.output and str(forget) in info.output
    # --no-resume on a finished folder still needs --overwrite; with it, the run starts over.
    again = runner.invoke(main, args + ["--no-resume", "--max-num-batches", "3"])
    assert again.exit_code != 0 and "already exists" in again.output
    fresh = runner.invoke(main, args + ["--no-resume", "--overwrite", "--max-num-batches", "3"])
    assert fresh.exit_code == 0, fresh.output
    assert "resumed" not in fresh.output and len(load_training_log(out)) == 3


def test_command_errors_are_one_line(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpah: 3\n")
    result = runner.invoke(main, ["intervene", "rmu", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "did you mean 'alpha'" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["intervene", "sft", "--preset", "nope", "--out", str(tmp_path / "o")])
    assert "Unknown preset 'nope'" in result.output
    assert not (tmp_path / "o").exists()


def test_groundtruth_lm_eval_reads_results_json_files(tmp_path):
    def results(acc):
        return {"results": {f"mmlu_{s}": {"acc,none": a, "acc_stderr,none": 0.02} for s, a in acc.items()},
                "n-samples": {f"mmlu_{s}": {"effective": 200} for s in acc}}

    before, after = tmp_path / "b.json", tmp_path / "a.json"
    before.write_text(json.dumps(results({"anatomy": 0.6, "virology": 0.7})))
    after.write_text(json.dumps(results({"anatomy": 0.58, "virology": 0.3})))
    result = CliRunner().invoke(main, ["groundtruth", "lm-eval", "--before-json", str(before), "--after-json",
                                       str(after), "--out", str(tmp_path / "gt")])
    assert result.exit_code == 0, result.output
    table = read_scores_csv(tmp_path / "gt" / SCORES_CSV)
    assert table[["category", "before", "after", "n"]].values.tolist() == [["anatomy", 0.6, 0.58, 200], ["virology", 0.7, 0.3, 200]]
    assert (table["test"] == "z").all() and table.loc[1, "p_value"] < 1e-6 < table.loc[0, "p_value"]
    # options that only running lm-eval reads are refused, not ignored
    result = CliRunner().invoke(main, ["groundtruth", "lm-eval", "--before-json", str(before), "--after-json",
                                       str(after), "--task", "mmlu_law", "--limit", "5", "--out", str(tmp_path / "gt2")])
    assert result.exit_code != 0 and "--task, --limit are for running lm-eval" in result.output
    assert not (tmp_path / "gt2").exists()
