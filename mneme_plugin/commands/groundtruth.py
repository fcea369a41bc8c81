"""``mneme groundtruth lm-eval|judge``: per-category scores of the base and the edited model, written as
the ``ground_truth.csv`` table that ``mneme evaluate --scores-csv`` reads."""

from __future__ import annotations

import click

from mneme_plugin.commands.common import add_options, build_config, clear_errors, config_options
from mneme_plugin.commands.intervene import presets

_pair_options = [
    click.option("--base", help="Base model (HF name or folder)."),
    click.option("--edited", help="Edited model (HF name or folder)."),
]


@click.group()
def groundtruth() -> None:
    """Measure what an edit really changed: benchmarks (lm-eval) or behaviour (LLM judge)."""


groundtruth.add_command(presets)


@groundtruth.command("lm-eval")
@add_options(_pair_options)
@click.option("--config", type=click.Path(dir_okay=False), help="YAML whose keys are LMEvalConfig's fields.")
@click.option("--preset", help="A shipped lm-eval preset by name (`mneme groundtruth presets` lists them); --config "
              "overrides it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--task", "tasks", multiple=True, help="lm-eval task or group (repeatable).")
@click.option("--include-path", "include_path", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of extra task YAMLs (repeatable).")
@click.option("--limit", type=float, help="Questions per task (lm-eval's --limit): a count, or a fraction below 1 "
              "of each task's questions.")
@click.option("--device", help="Where the models run: auto (default: cuda when there is one), cuda, cuda:N, cpu.")
@click.option("--before-json", type=click.Path(exists=True, dir_okay=False),
              help="Read lm-eval results produced elsewhere instead of running lm-eval (with --after-json).")
@click.option("--after-json", type=click.Path(exists=True, dir_okay=False),
              help="The edited model's lm-eval results file (with --before-json).")
@click.option("--metric", help="lm-eval metric key, e.g. acc,none (default: per task, the first known one).")
@clear_errors
def lm_eval_command(base, edited, config, preset, out, tasks, include_path, limit, device, before_json, after_json,
                    metric) -> None:
    """Run lm-evaluation-harness on base and edited (or read its JSON results) and write the table."""
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.groundtruth.harness import LMEvalConfig, lm_eval_ground_truth, lm_eval_table_from_files

    if before_json or after_json:
        if not (before_json and after_json):
            raise ConfigError("Pass both --before-json and --after-json.")
        running = {"--base": base, "--edited": edited, "--config": config, "--preset": preset, "--task": tasks,
                   "--include-path": include_path, "--limit": limit, "--device": device}
        unused = [name for name, value in running.items() if value]
        if unused:
            raise ConfigError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for running lm-eval; with "
                              "--before-json / --after-json the results are read as they are (only --metric and "
                              "--out apply): leave them out, or drop the JSON files to run lm-eval.")
        table = lm_eval_table_from_files(before_json, after_json, out, metric)
    else:
        limit = int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit
        cfg = build_config(LMEvalConfig, "lm_eval", preset, config, base=base, edited=edited, tasks=list(tasks) or None,
                           include_path=list(include_path) or None, limit=limit, device=device, metric=metric)
        table = lm_eval_ground_truth(cfg, out)
    _echo_table(table, out)


@groundtruth.command()
@add_options(_pair_options + config_options)
@click.option("--questions", help="Question file, folder or hf: spec.")
@click.option("--samples", "samples_per_question", type=int, help="Answers per question.")
@clear_errors
def judge(base, edited, config, preset, out, questions, samples_per_question) -> None:
    """Answer a question set with both models and score the answers with an LLM judge.

    The shipped judge presets call OpenAI's API (https://api.openai.com/v1): export OPENAI_API_KEY first
    (a missing key is refused before any model answers), or point judge.base_url at another
    OpenAI-compatible endpoint that returns log-probabilities."""
    from mneme_plugin.groundtruth.judge import JudgeConfig, judge_ground_truth

    cfg = build_config(JudgeConfig, "judge", preset, config, base=base, edited=edited, questions=questions,
                       samples_per_question=samples_per_question)
    _echo_table(judge_ground_truth(cfg, out), out)


def _echo_table(table, out) -> None:
    from pathlib import Path

    from mneme_plugin.groundtruth.table import SCORES_CSV
    from mneme_plugin.sideeffects.metrics import UNDEFINED

    shown = table[["category", "before", "after", "drop", "n", "p_value"]]
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=UNDEFINED))
    click.echo(f"Ground truth: {Path(out) / SCORES_CSV}")
