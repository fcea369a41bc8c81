"""`mneme intervene` and `mneme groundtruth` through the real CLI."""

from __future__ import annotations

import json

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
