"""`mneme run --dry-run`'s estimates for the case-study recipes (offline: known architectures)."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.pipeline.dry_run import KNOWN_ARCHITECTURES, parameter_count
from tests.helpers import hub_cache_repo

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _intervention_line(recipe: str) -> str:
    result = CliRunner().invoke(main, ["run", "--dry-run", str(RECIPES / recipe)])
    lines = [line for line in result.output.splitlines() if line.strip().startswith("intervention (")]
    assert len(lines) == 1, result.output
    return lines[0]


def _checkpoint_gib(line: str) -> float | None:
    found = re.search(r"a checkpoint of ~([\d.]+) ([KMGT])iB", line)
    return float(found.group(1)) * 1024.0 ** ("KMGT".index(found.group(2)) - 2) if found else None


def test_the_intervention_estimate_names_the_checkpoint_size_where_it_is_large():
    # Full fine-tuning of Llama-2-7B (6.74B parameters, its model card): the weights and two AdamW moments in bf16.
    full = _checkpoint_gib(_intervention_line("benign_finetuning/llama2_7b_alpaca.yaml"))
    assert full is not None and abs(full / (6.74e9 * 6 / 2**30) - 1) < 0.01
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
    assert "ground_truth mmlu_pro (lm-eval, 6,653 questions x 2 models)" in result.output, result.output


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_parameter_count_from_config_fields_is_that_of_the_model_transformers_builds(family, tied):
    """Sizes (downloads, the edited model, checkpoints, time) come from config.json fields; the count is
    checked against the model transformers builds from the same config (grouped key/value heads, an explicit
    head_dim, Qwen2's biases, Gemma 2's four norms per layer, tied embeddings)."""
    import torch
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "gemma2": transformers.Gemma2Config}
    extra = {"head_dim": 24} if family == "gemma2" else {}
    config = classes[family](vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **extra)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())
    assert parameter_count(json.loads(config.to_json_string())) == expected


# Parameter counts of the model cards (Hugging Face pages) of the known architectures.
PUBLISHED = {"zephyr-7b": 7.24e9, "mistral-7b": 7.24e9, "llama-3-8b": 8.03e9, "llama-3.1-70b": 70.6e9,
             "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "gemma-2-2b": 2.61e9, "gemma-2-9b": 9.24e9,
             "qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.61e9,
             "qwen2.5-coder-32b": 32.8e9, "llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_known_architectures_have_their_published_sizes(name):
    assert abs(parameter_count(KNOWN_ARCHITECTURES[name]) / PUBLISHED[name] - 1) < 0.01


def _dry_run(config: Path) -> str:
    result = CliRunner().invoke(main, ["run", "--dry-run", str(config)])
    assert result.exit_code == 0, result.output
    return result.output


def _disk_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(("ok   disk:", "WARN disk:"))]


def test_the_dry_run_sizes_the_hub_downloads_and_what_the_run_writes_against_the_free_disk(tmp_path, hub_cache, monkeypatch):
    """Before: nothing said that a 7B recipe downloads ~14 GiB per model into the hub cache, nor that its
    crosscoder's checkpoints take ~100 GiB, nor checked the free space where they go; and the store was
    checked against the disk of "/" whatever disk run_dir is on. Now the downloads (not of a model whose
    weights are cached), the crosscoder's checkpoints, the edited model and the store are summed per disk
    against its free space (a line "ok" or "WARN" by this machine's free space: both are read here)."""
    import yaml

    from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
    from mneme_plugin.crosscoder.training import disk_need

    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((RECIPES / "wmdp_rmu/zephyr_7b.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "run")
    config = tmp_path / "zephyr.yaml"
    config.write_text(yaml.safe_dump(recipe))
    size = parameter_count(KNOWN_ARCHITECTURES["zephyr-7b"]) * 2 / 2**30  # bf16
    checkpoint, at_once, final = (n / 2**30 for n in disk_need(CrossCoderConfig.from_dict(recipe["crosscoder"]).resolve(4096),
                                                               TrainingConfig.from_dict(recipe["training"])))
    assert [round(n, 1) for n in (checkpoint, at_once, final)] == [24.0, 72.0, 8.0]  # 2.15B fp32 weights, Adam's moments; 3 at once
    lines = _disk_lines(_dry_run(config))
    assert len(lines) == 2 and "training.stream is set" in lines[0], lines
    # The hub cache and run_dir are on one disk here (both under tmp_path): one line, both downloads, the
    # crosscoder's checkpoints and files (run_dir gets no store: training.stream).
    assert re.match(rf"(ok|WARN) disk: {hub_cache} and {tmp_path / 'run'}(: ~| needs ~){round(2 * size, 1) + round(at_once, 1) + round(final, 1):.1f} GiB "
                    "at its peak", lines[1]), lines
    assert (f"(download of HuggingFaceH4/zephyr-7b-beta ~{size:.1f} GiB; download of cais/Zephyr_RMU ~{size:.1f} GiB; "
            "crosscoder checkpoints (up to 3 of 24.0 GiB at once) ~72.0 GiB, while it trains; crosscoder ~8.0 GiB)"
            in lines[1]), lines

    # The base model's config.json alone in the cache (as configuration checks leave it): still a download,
    # sized from its own fields; with its weights there, none.
    folder = tmp_path / "zephyr-files"
    folder.mkdir()
    fields = dict(KNOWN_ARCHITECTURES["zephyr-7b"], model_type="mistral", vocab_size=64000)
    (folder / "config.json").write_text(json.dumps(fields))
    snapshot = hub_cache_repo(hub_cache, "HuggingFaceH4/zephyr-7b-beta", folder)
    larger = parameter_count(fields) * 2 / 2**30
    lines = _disk_lines(_dry_run(config))
    assert f"download of HuggingFaceH4/zephyr-7b-beta ~{larger:.1f} GiB;" in lines[1], lines
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    assert "download of HuggingFaceH4/zephyr-7b-beta" in _disk_lines(_dry_run(config))[1]  # a shard is missing
    (snapshot / "model-1.safetensors").write_bytes(b"")
    lines = _disk_lines(_dry_run(config))
    assert "HuggingFaceH4/zephyr-7b-beta" not in lines[1] and "download of cais/Zephyr_RMU" in lines[1], lines

    # A store larger than any disk: a warning (the run may be meant for another machine), with what to change.
    recipe["training"]["stream"] = False
    recipe["harvest"]["max_tokens"] = 10**12
    config.write_text(yaml.safe_dump(recipe))
    output = _dry_run(config)
    store = [line for line in _disk_lines(output) if line.startswith("WARN")]
    assert len(store) == 1 and store[0].startswith(f"WARN disk: {hub_cache} and {tmp_path / 'run'} needs ~"), output
    assert "activation store of 1,000,000,000,000 tokens (bfloat16) ~" in store[0], output
    assert "lower harvest.max_tokens or set training.stream: true" in store[0]
    assert "set HF_HOME (or HF_HUB_CACHE) to a folder on a larger disk" in store[0]  # the downloads share the disk
    for remedy in ("a smaller crosscoder (crosscoder.expansion_factor or dict_size)",
                   "set run_dir to a folder on a larger disk"):  # what several items share, said once
        assert store[0].count(remedy) == 1, store[0]
    assert "The config looks runnable, but read the WARN lines above first." in output


def test_checkpoints_of_stages_that_run_one_after_the_other_are_not_added_up(tmp_path, hub_cache, monkeypatch):
    """Full fine-tuning of Llama-2-7B checkpoints ~75 GiB while it trains and the crosscoder ~72 GiB while it
    trains; the intervention's are gone before the crosscoder trains, so the peak holds the larger alone."""
    import yaml

    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((RECIPES / "benign_finetuning/llama2_7b_alpaca.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "run")
    config = tmp_path / "alpaca.yaml"
    config.write_text(yaml.safe_dump(recipe))
    line = _disk_lines(_dry_run(config))[1]
    sizes = {what: float(gib) for what, gib in re.findall(r"(?:\(|; )([^;(]+?)(?: \([^)]*\))? ~([\d.]+) GiB", line)}
    model = parameter_count(KNOWN_ARCHITECTURES["llama-2-7b"])
    assert sizes["the intervention's last checkpoint and the one being written"] == round(2 * 3 * 2 * model / 2**30, 1)
    assert sizes["crosscoder checkpoints"] == 72.0
    peak = (sizes["download of meta-llama/Llama-2-7b-chat-hf"] + sizes["edited model"] + sizes["crosscoder"]
            + sizes["the intervention's last checkpoint and the one being written"])
    total = re.search(r"(?:: ~| needs ~)([\d.]+) GiB at its peak", line)
    assert total is not None and abs(float(total.group(1)) - peak) < 0.2, (peak, line)  # the parts are rounded
    assert peak + sizes["crosscoder checkpoints"] - float(total.group(1)) > 70  # the sum would hold both

    # Kept after training, the crosscoder's checkpoints stay beside everything else.
    recipe["training"]["keep_finished_checkpoints"] = True
    config.write_text(yaml.safe_dump(recipe))
    line = _disk_lines(_dry_run(config))[1]
    assert "crosscoder checkpoints (up to 3 of 24.0 GiB at once, kept after training) ~72.0 GiB;" in line, line
    kept = re.search(r"(?:: ~| needs ~)([\d.]+) GiB at its peak", line)
    assert kept is not None and abs(float(kept.group(1)) - (peak + 72.0)) < 0.2, (peak, line)


def test_an_in_process_vllm_explainer_is_a_download_too(tmp_path, hub_cache, monkeypatch):
    """`explain.client.kind: vllm` loads its model from the hub in this process: Llama-3.1-70B is ~131 GiB
    in the hub cache, counted with the run's own models (an OpenAI-compatible server's model is not)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((RECIPES / "wmdp_rmu/zephyr_7b.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "run")
    config = tmp_path / "zephyr.yaml"
    config.write_text(yaml.safe_dump(recipe))
    assert "Llama-3.1-70B" not in _disk_lines(_dry_run(config))[1]  # served by `vllm serve`: not ours to download
    recipe["explain"]["client"] = {"kind": "vllm", "model": "meta-llama/Llama-3.1-70B-Instruct"}
    config.write_text(yaml.safe_dump(recipe))
    size = parameter_count(KNOWN_ARCHITECTURES["llama-3.1-70b"]) * 2 / 2**30
    assert f"download of meta-llama/Llama-3.1-70B-Instruct ~{size:.1f} GiB" in _disk_lines(_dry_run(config))[1]


def test_the_dry_run_sizes_and_times_only_the_stages_the_run_will_do(llama_dir, tmp_path):
    """The dry run added up every stage's writes and times, done or not: after a harvest of hours its store
    was counted again (against a disk it already filled), while `mneme run` would go on to training."""
    import yaml

    from tests.helpers import pipeline_inputs

    _, edited, corpus, truth = pipeline_inputs(llama_dir, tmp_path, n_documents=40)
    config = {"run_dir": str(tmp_path / "run"), "models": {"base": str(llama_dir), "edited": str(edited)},
              "corpus": {"source": str(corpus)},
              "harvest": {"layer": 1, "context_length": 32, "dtype": "float32", "max_tokens": 1000},
              "crosscoder": {"expansion_factor": 4, "k": 8}, "training": {"steps": 40, "batch_size": 128},
              "ground_truth": {"scores_csv": str(truth)}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    def dry(*args: str) -> str:
        result = CliRunner().invoke(main, ["run", "--dry-run", str(path), *args])
        assert result.exit_code == 0, result.output
        return result.output

    fresh = dry()
    assert "activation store of 1,000 tokens (float32) ~" in fresh and "  harvest: ~" in fresh and "  train: ~" in fresh
    assert "crosscoder ~" in fresh
    assert CliRunner().invoke(main, ["run", str(path), "--only", "harvest"]).exit_code == 0
    harvested = dry()
    assert "activation store" not in harvested and "  harvest: ~" not in harvested, harvested
    assert "crosscoder ~" in harvested and "  train: ~" in harvested
    assert re.search(r"  harvest +skip \(done\)", harvested), harvested  # the plan printed is the one sized
    only_harvest = dry("--only", "harvest")  # done, and training not selected: nothing large left to write
    assert "crosscoder ~" not in only_harvest and "  train: ~" not in only_harvest
    assert "disk: the stages that write large files (harvest, train) are done or not selected" in only_harvest
    # A selected stage that reads one neither done nor selected fails here, not when it starts.
    only_attribute = CliRunner().invoke(main, ["run", "--dry-run", str(path), "--only", "attribute"])
    assert only_attribute.exit_code == 1 and ("FAIL --only attribute: it reads what train writes, which is not done "
                                              "(run) and not selected: add --only train") in only_attribute.output
    bad = CliRunner().invoke(main, ["run", "--dry-run", str(path), "--only", "trian"])
    assert bad.exit_code != 0 and "Unknown stage(s) ['trian']" in bad.output


def test_a_hub_corpus_without_a_token_budget_is_refused_and_a_local_one_is_not_sized(llama_dir, tmp_path):
    """No harvest.max_tokens with a streamed hub data set (The Pile) harvested all of it until the disk filled;
    the dry run called it "ok" and counted no store."""
    import yaml

    config = {"run_dir": str(tmp_path / "run"), "models": {"base": str(llama_dir), "edited": str(llama_dir)},
              "corpus": {"source": "hf:monology/pile-uncopyrighted"}, "harvest": {"layer": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(path)])
    assert dry.exit_code == 1 and "FAIL harvest.max_tokens is not set and corpus.source is a Hugging Face data set" in dry.output
    refused = CliRunner().invoke(main, ["run", str(path)])
    assert refused.exit_code != 0 and "set harvest.max_tokens" in refused.output and not (tmp_path / "run").exists()
    config["harvest"]["max_tokens"] = 1000
    path.write_text(yaml.safe_dump(config))
    assert "FAIL harvest.max_tokens" not in CliRunner().invoke(main, ["run", "--dry-run", str(path)]).output

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    config["corpus"]["source"], config["harvest"] = str(corpus), {"layer": 1}
    path.write_text(yaml.safe_dump(config))
    dry = CliRunner().invoke(main, ["run", "--dry-run", str(path)])
    assert "WARN disk: harvest.max_tokens is not set: the whole corpus is harvested, and the store's size is not " \
           "counted" in dry.output, dry.output
    assert "activation store" not in dry.output


def test_the_edited_model_and_its_checkpoints_are_sized_in_the_dtype_the_intervention_trains_in(tmp_path, hub_cache, monkeypatch):
    """The dry run called the edited model bf16 whatever the intervention's dtype: on a CPU (`auto` is float32
    there) or with `dtype: float32` it is twice that, and so are the full fine-tuning's checkpoints."""
    import yaml

    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((RECIPES / "benign_finetuning/llama2_7b_alpaca.yaml").read_text())
    recipe["run_dir"] = str(tmp_path / "run")
    config = tmp_path / "alpaca.yaml"
    params = parameter_count(KNOWN_ARCHITECTURES["llama-2-7b"])

    def sizes(**settings):
        recipe["intervention"]["settings"] = {**recipe["intervention"].get("settings", {}), **settings}
        config.write_text(yaml.safe_dump(recipe))
        line = _disk_lines(_dry_run(config))[1]
        found = dict(re.findall(r"(edited model \(\w+\)|the intervention's last checkpoint[^~]*) ~([\d.]+) GiB", line))
        return {what.strip(): float(gib) for what, gib in found.items()}

    gpu = sizes()
    assert gpu["edited model (bfloat16)"] == round(2 * params / 2**30, 1)
    for settings in ({"device": "cpu"}, {"dtype": "float32"}):
        wide = sizes(**settings)
        assert wide["edited model (float32)"] == round(4 * params / 2**30, 1), settings
        checkpoints = "the intervention's last checkpoint and the one being written"
        assert abs(wide[checkpoints] / gpu[checkpoints] - 2) < 0.01, settings
        recipe["intervention"]["settings"] = {k: v for k, v in recipe["intervention"]["settings"].items()
                                              if k not in settings}


def test_the_lm_eval_estimate_counts_the_rows_of_local_tasks_named_like_benchmarks(tmp_path):
    """A local task named like a benchmark (the smoke recipes' `wmdp_bio` of 12 rows) counts its file's rows,
    not the benchmark's 1,273; a group of local tasks counts its members' rows, `limit` cutting each; a
    task whose data cannot be counted keeps the known size."""
    from mneme_plugin.groundtruth.harness import LMEvalConfig
    from mneme_plugin.pipeline.dry_run import LM_EVAL_QUESTIONS, _lm_eval_questions
    from tests.helpers import write_lm_eval_group, write_lm_eval_task

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    sizes = {"wmdp_bio": 12, "wmdp_cyber": 30, "mmlu_anatomy": 7}
    for seed, (name, n) in enumerate(sizes.items()):
        write_lm_eval_task(tasks, name, n=n, seed=seed)
    write_lm_eval_group(tasks, "wmdp", ["wmdp_bio", "wmdp_cyber"])
    config = LMEvalConfig(base="b", edited="e", tasks=["wmdp", "mmlu_anatomy"], include_path=[str(tasks)],
                          include_defaults=False)
    assert _lm_eval_questions(config) == 12 + 30 + 7
    assert _lm_eval_questions(config.replace(limit=10)) == 10 + 10 + 7
    assert _lm_eval_questions(config.replace(limit=0.5)) == 6 + 15 + 4  # lm-eval rounds a share up
    (tasks / "wmdp_cyber.jsonl").unlink()  # not countable: the group falls back to the benchmark's size
    assert _lm_eval_questions(config) == LM_EVAL_QUESTIONS["wmdp"] + 7


def test_a_control_run_without_attribution_is_a_warning(tmp_path):
    """predict.control_run naming a run that has not attributed its latents failed only at the predict
    stage, after every other; the dry run warns (the control may be produced beside this run)."""
    import yaml

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    config = {"run_dir": str(tmp_path / "run"), "models": {"base": str(tmp_path), "edited": str(tmp_path)},
              "corpus": {"source": str(corpus)}, "harvest": {"layer": 1, "max_tokens": 1000},
              "predict": {"control_run": str(tmp_path / "control")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    warning = f"WARN predict.control_run {tmp_path / 'control'} has no attribution yet"
    assert warning in CliRunner().invoke(main, ["run", "--dry-run", str(path)]).output
    (tmp_path / "control" / "attribution").mkdir(parents=True)
    assert warning not in CliRunner().invoke(main, ["run", "--dry-run", str(path)]).output


def test_an_embedding_model_that_is_no_local_model_folder_is_refused_before_the_first_stage(llama_dir, tmp_path):
    """map.embedding_model misspelt (or a hub id: the mapper loads local folders only) failed at the map stage,
    after the harvest and the training, while the dry run called the config runnable."""
    import yaml

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 50)
    empty = tmp_path / "empty"
    empty.mkdir()
    model = tmp_path / "minilm"
    model.mkdir()
    (model / "modules.json").write_text("[]")
    config = {"run_dir": str(tmp_path / "run"), "models": {"base": str(llama_dir), "edited": str(llama_dir)},
              "corpus": {"source": str(corpus)}, "harvest": {"layer": 1}}
    path = tmp_path / "run.yaml"
    for given, expected in ((tmp_path / "minlm", "is not a local folder (it does not exist)"),
                            ("sentence-transformers/all-MiniLM-L6-v2", "download it first"),
                            (empty, f"the folder {empty} is empty: expected a sentence-transformers model folder")):
        config["map"] = {"taxonomies": ["organism"], "method": "embedding", "embedding_model": str(given)}
        path.write_text(yaml.safe_dump(config))
        dry = CliRunner().invoke(main, ["run", "--dry-run", str(path)])
        assert dry.exit_code == 1 and "FAIL map.embedding_model: " in dry.output, dry.output
        assert expected in " ".join(dry.output.split()), dry.output
        refused = CliRunner().invoke(main, ["run", str(path)])
        assert refused.exit_code != 0 and "map.embedding_model" in refused.output and not (tmp_path / "run").exists()
    config["map"]["embedding_model"] = str(model)
    path.write_text(yaml.safe_dump(config))
    assert "FAIL map.embedding_model" not in CliRunner().invoke(main, ["run", "--dry-run", str(path)]).output
