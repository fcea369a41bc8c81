"""`mneme run --dry-run`'s estimates for the case-study recipes (offline: known architectures)."""

import re
from pathlib import Path

from click.testing import CliRunner

from mneme_plugin.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _intervention_line(recipe: str) -> str:
    result = CliRunner().invoke(main, ["run", "--dry-run", str(RECIPES / recipe)])
    lines = [line for line in result.output.splitlines() if line.strip().startswith("intervention (")]
    assert len(lines) == 1, result.output
    return lines[0]


def _checkpoint_gib(line: str) -> float | None:
    found = re.search(r"a checkpoint of ~([\d.]+) GiB", line)
    return float(found.group(1)) if found else None


def test_the_intervention_estimate_names_the_checkpoint_size_where_it_is_large():
    # Full fine-tuning of a 7B (d 4096, 32 layers): the weights and two AdamW moments in bf16.
    params = 12 * 32 * 4096**2 + 2 * 128_000 * 4096
    full = _checkpoint_gib(_intervention_line("benign_finetuning/llama2_7b_alpaca.yaml"))
    assert full is not None and abs(full - params * 6 / 2**30) < 0.1
    # RMU trains one MLP projection in each of three layers: about a GiB.
    rmu = _checkpoint_gib(_intervention_line("wmdp_rmu/llama_3_8b.yaml"))
    assert rmu is not None and 0.5 < rmu < 1.5
    # LoRA adapters are small: no checkpoint size is worth a line.
    assert _checkpoint_gib(_intervention_line("emergent_misalignment/qwen2_5_coder_7b.yaml")) is None


def test_a_streamed_recipe_counts_the_harvest_of_train_and_the_one_of_attribute():
    """Streaming keeps no store, so attribute harvests the corpus again: the estimate said one harvest."""
    result = CliRunner().invoke(main, ["run", "--dry-run", str(RECIPES / "wmdp_rmu/llama_3_8b.yaml")])
    line = next(line for line in result.output.splitlines() if line.strip().startswith("harvest: ~"))
    once = re.search(r"harvest: ~([\d.]+ h) for", line)
    assert once is not None, line
    assert line.endswith(f", twice with training.stream (in train, then ~{once.group(1)} again in attribute)"), line


def test_the_gated_organisation_names_the_models_that_need_access():
    """Zephyr's recipe listed `meta-llama/` as gated without saying which model: only its explainer is one."""
    result = CliRunner().invoke(main, ["run", "--dry-run", str(RECIPES / "wmdp_rmu/zephyr_7b.yaml")])
    assert "  meta-llama/ (meta-llama/Llama-3.1-70B-Instruct): request access" in result.output, result.output


def test_an_sft_estimate_counts_the_data_file_and_says_it_is_unknown_while_the_file_is_missing(tmp_path, monkeypatch):
    """The AOA recipe trains on 10 examples: before its data file exists the estimate was "~2.1 h per 10k
    examples", read as the intervention's time; it now says the time is unknown until the file exists,
    and with the file counts its examples."""
    monkeypatch.chdir(tmp_path)  # the recipe's relative data path, not there yet
    line = _intervention_line("benign_finetuning/llama2_7b_aoa.yaml")
    assert "intervention (sft): time unknown until data/benign_finetuning/aoa_train.jsonl exists (~" in line, line
    assert " per 10k examples, 10 epoch(s)); edited model" in line, line
    rate = re.search(r"\(~([\d.]+) h per 10k", line)
    assert rate is not None, line
    data = tmp_path / "data" / "benign_finetuning" / "aoa_train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"messages": []}\n' * 10)
    line = _intervention_line("benign_finetuning/llama2_7b_aoa.yaml")
    # 10 examples take a thousandth of the 10k examples' time (~8 s, not "0 min").
    seconds = re.search(r"intervention \(sft\): ~(\d+) s; edited model", line)
    assert seconds is not None, line
    assert abs(int(seconds.group(1)) - float(rate.group(1)) * 3600 / 1000) < 1.5  # the rate is rounded to 0.1 h


def test_the_lm_eval_estimate_applies_limit_per_task_of_a_group(tmp_path):
    """lm-eval's `limit` caps each task, not each name listed: `mmlu_pro` with `limit: 50` asks 50 of each
    of its 14 categories (700 questions); the estimate counted 50."""
    import yaml

    recipe = yaml.safe_load((RECIPES / "emergent_misalignment/qwen2_5_coder_7b.yaml").read_text())
    recipe["ground_truth"]["tables"]["mmlu_pro"]["lm_eval"]["limit"] = 50
    recipe["ground_truth"]["tables"]["mmlu_pro"]["lm_eval"]["tasks"] = ["mmlu_pro", "wmdp_bio"]
    config = tmp_path / "limited.yaml"
    config.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    assert "ground_truth mmlu_pro (lm-eval, 750 questions x 2 models)" in result.output, result.output
    recipe["ground_truth"]["tables"]["mmlu_pro"]["lm_eval"]["limit"] = 0.5  # a fraction of every task
    config.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    assert "ground_truth mmlu_pro (lm-eval, 6,652 questions x 2 models)" in result.output, result.output
