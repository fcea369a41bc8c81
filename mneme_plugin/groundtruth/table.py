"""The ground-truth table: per-category scores before and after the edit, its readers and its writer.

This is the one format every ground truth ends in (the organism's cloze benchmark, lm-eval runs,
LLM-judge rates) and the one that ``evaluate`` reads: a CSV with columns ``category``, ``before``,
``after`` and optionally ``n`` (questions per category) and ``stderr``; extra columns are kept.
lm-eval results JSON files are read into the same table.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.config import ConfigMixin, require
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import atomic_write
from mneme_plugin.stats import hypergeometric_sf

SCORES_CSV = "ground_truth.csv"
REQUIRED_COLUMNS = ("category", "before", "after")
TASK_PREFIXES = ("mmlu_pro_", "mmlu_", "wmdp_")
# The columns lm-eval and judge ground truths write (the first four plus n are what evaluate reads).
TABLE_COLUMNS = ["category", "before", "after", "drop", "n", "stderr_before", "stderr_after", "p_value", "test"]
# First metric present wins (MMLU / WMDP: acc; MMLU-Pro: exact_match with its custom extraction).
PREFERRED_METRICS = ("acc,none", "exact_match,custom-extract", "exact_match,strict-match",
                     "exact_match,flexible-extract", "exact_match,none")
# Per-sample scores our lm-eval runs add to the results (McNemar's test): task -> metric -> doc id -> score,
# every metric and filter lm-eval logged (earlier versions: task -> doc id -> score, of the one metric their
# run chose), and the key of the run that measured them.
PER_SAMPLE_KEY = "mneme_per_sample"
RUN_KEY = "mneme_run"


@dataclass
class GroundTruthConfig(ConfigMixin):
    """Per-category scores before / after the edit: a scores CSV (category, before, after[, n]) or
    two lm-eval results JSON files (before, after)."""

    scores_csv: str | None = None
    lm_eval_before: str | None = None
    lm_eval_after: str | None = None

    def __post_init__(self) -> None:
        require(
            (self.lm_eval_before is None) == (self.lm_eval_after is None),
            "ground_truth.lm_eval_before and lm_eval_after go together.",
        )
        require(not (self.scores_csv and self.lm_eval_before), "Give ground_truth.scores_csv or the lm-eval pair, not both.")

    @property
    def available(self) -> bool:
        return bool(self.scores_csv or self.lm_eval_before)

    def files(self) -> list[str]:
        """The files this ground truth is read from."""
        return [p for p in (self.scores_csv, self.lm_eval_before, self.lm_eval_after) if p]


def scores_table(before: Mapping[str, float], after: Mapping[str, float],
                 n: Mapping[str, int] | None = None) -> pd.DataFrame:
    """The table from per-category scores (categories in ``before``'s order; both must cover the same)."""
    if set(before) != set(after):
        raise ConfigError(f"before and after cover different categories: {sorted(set(before) ^ set(after))}.")
    table = pd.DataFrame({"category": list(before), "before": [float(before[c]) for c in before],
                          "after": [float(after[c]) for c in before]})
    table["n"] = [n.get(c) for c in before] if n is not None else None
    return table


def save_scores(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the table as CSV (atomically)."""
    _check_table(table, Path(path))
    return atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def start_measurement(out_dir: str | os.PathLike[str], config_file: str, config: ConfigMixin) -> Path:
    """The output folder of a measurement (`mneme groundtruth lm-eval|judge`) as it starts: made, an earlier
    measurement's ``SCORES_CSV`` removed (the table is written last: it must not outlive the config beside it
    when this one stops early), and ``config`` written to ``config_file``."""
    import yaml

    from mneme_plugin.files import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SCORES_CSV).unlink(missing_ok=True)
    atomic_write_text(out / config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out


def checked_scores(table: pd.DataFrame, where: str = "the ground-truth table") -> pd.DataFrame:
    """A copy of ``table`` checked as a ground-truth file is (category, before, after[, n]; numbers, scores in
    [0, 1], whole question counts, each category once): what ``evaluate`` takes from Python."""
    if not isinstance(table, pd.DataFrame):
        raise ConfigError(f"{where} must be a pandas DataFrame (category, before, after[, n]), got "
                          f"{type(table).__name__}; a CSV file is read by read_scores_csv.")
    return _check_table(table.copy(), where)


def _check_table(table: pd.DataFrame, path: Path | str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"{path} lacks column(s) {missing}; a ground-truth table needs category, before, after[, n].")
    blank = table["category"].isna() | (table["category"].astype(str).str.strip() == "")
    if blank.any():
        rows = [int(i) + 2 for i in table.index[blank][:5]]  # file lines (after the header)
        raise ConfigError(f"{path}: line(s) {rows} have no category; give every row one.")
    table["category"] = table["category"].astype(str).str.strip()
    for column in ("before", "after", "n", "stderr"):
        if column not in table.columns:
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.loc[values.isna() & table[column].notna(), "category"].astype(str).tolist()
        if bad or (column in ("before", "after") and values.isna().any()):
            shown = bad or table.loc[values.isna(), "category"].astype(str).tolist()
            raise ConfigError(f"{path}: column {column!r} must hold numbers; categories {shown[:5]} do not.")
        table[column] = values
    for column in ("before", "after"):
        outside = table.loc[~table[column].between(0.0, 1.0), "category"].astype(str).tolist()
        if outside:
            raise ConfigError(f"{path}: column {column!r} must hold scores in [0, 1] (accuracies or rates: 0.9, not "
                              f"90); categories {outside[:5]} do not.")
    if "n" in table.columns:
        counts = pd.to_numeric(table["n"], errors="coerce")
        bad = table.loc[counts.notna() & ((counts < 1) | (counts % 1 != 0)), "category"].astype(str).tolist()
        if bad:
            raise ConfigError(f"{path}: column 'n' (questions per category) must hold positive whole numbers; "
                              f"categories {bad[:5]} do not.")
    duplicated = table["category"][table["category"].duplicated()].astype(str).tolist()
    if duplicated:
        raise ConfigError(f"{path}: categories {duplicated[:5]} appear more than once.")
    return table


def _refuse_extra_fields(path: Path) -> None:
    """ConfigError naming the lines with more fields than the header: pandas reads a file whose rows all
    have one more as indexed by its first column (every value shifted one column left), others not at all."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        lines = [reader.line_num for row in reader if len(row) > len(header)]
    if lines:
        shown = ", ".join(header)
        raise ConfigError(
            f"{path}: line(s) {lines[:10]} have more fields than the header ({len(header)}: {shown}). Remove the "
            "extra fields, name their columns in the header, or quote a value holding a comma (\"a, b\")."
        )


def read_scores_csv(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A ground-truth CSV: ``category``, ``before``, ``after`` and optionally ``n`` (and more columns)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Ground-truth file {path} does not exist.")
    try:
        _refuse_extra_fields(path)
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{path} is not a readable CSV file: {err}") from err
    table = _check_table(table, path)
    if "n" not in table.columns:
        table["n"] = None
    return table


def category_from_task(task: str) -> str:
    """lm-eval task name to category: ``mmlu_high_school_biology`` -> ``high_school_biology``."""
    for prefix in TASK_PREFIXES:
        if task.startswith(prefix):
            return task[len(prefix):]
    return task


def read_results_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An lm-eval results JSON file (``lm_eval --output_path``), checked to be one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not a readable lm-eval results JSON: {err}") from err
    _check_results(data, str(path))
    return data


def _check_results(data: Any, where: str) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ConfigError(f"{where} has no 'results' mapping; is it an lm-eval results file?")
    for key, what in (("n-samples", "task -> counts"), ("group_subtasks", "group -> subtasks"),
                      ("groups", "group -> metrics")):
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key!r} is a {type(value).__name__}, expected a mapping {what}; "
                              "is it an lm-eval results file?")


def group_names(data: dict[str, Any]) -> set[str]:
    """The groups of an lm-eval results file (``mmlu``, ``mmlu_stem``): their rows in ``results`` are
    lm-eval's aggregates over their subtasks, not categories. lm-eval lists them in ``groups`` (those
    with an aggregate) and ``group_subtasks`` (each group with its children; before 0.4.2 every task,
    a task with no children); only tasks have ``n-samples``."""
    children = data.get("group_subtasks") or {}
    return set(data.get("groups") or {}) | {name for name, subtasks in children.items() if subtasks}


def task_metrics(before: dict[str, Any], after: dict[str, Any], tasks: Sequence[str],
                 metric: str | dict[str, str] | None, where: str) -> dict[str, str | None]:
    """Per task the metric asked for: ``metric`` itself when a string or None (None: the first of
    PREFERRED_METRICS the task has); from a mapping of task or group names to metrics (ARC's ``acc_norm``
    beside MMLU's ``acc`` in one table), the task's own entry, else its nearest group's (lm-eval's
    ``group_subtasks``), else None. A key that names no task or group of the results is a ConfigError."""
    if not isinstance(metric, dict):
        return {task: metric for task in tasks}
    parents: dict[str, str] = {}
    for data in (before, after):
        for group, children in (data.get("group_subtasks") or {}).items():
            for child in children or []:
                if child != group:
                    parents.setdefault(child, group)
    known = set(tasks) | set(parents.values())
    unknown = [key for key in metric if key not in known]
    if unknown:
        raise ConfigError(f"{where}: metric names {unknown[:6]}, no task or group of the results (tasks: "
                          f"{sorted(tasks)[:8]}{'...' if len(tasks) > 8 else ''}; groups: {sorted(set(parents.values()))[:8]}).")
    chosen: dict[str, str | None] = {}
    for task in tasks:
        name, seen = task, set()
        while name not in metric and name in parents and name not in seen:
            seen.add(name)
            name = parents[name]
        chosen[task] = metric.get(name)
    return chosen


def metric_for(values: dict[str, Any], metric: str | None) -> str | None:
    """The metric to read from one task's results: ``metric`` if it has it, else the first of PREFERRED_METRICS."""
    if metric is not None:
        return metric if metric in values else None
    return next((m for m in PREFERRED_METRICS if m in values), None)


def metric_names(values: dict[str, Any]) -> list[str]:
    """The metric keys of one task's results (``acc,none``, ``exact_match,custom-extract``), less their
    standard errors."""
    return [key for key in values if "," in key and "_stderr," not in key]


def _per_sample(data: dict[str, Any], task: str, metric: str) -> dict[str, float] | None:
    """``task``'s per-sample scores of ``metric`` in our lm-eval results; None when they hold none."""
    scores = (data.get(PER_SAMPLE_KEY) or {}).get(task)
    if not isinstance(scores, dict) or not scores:
        return None
    if all(isinstance(v, dict) for v in scores.values()):  # per metric and filter
        return scores.get(metric) or None
    # An earlier version's results: the scores of the metric its run chose (its key's `metric`, else the
    # first preferred one), not necessarily the one chosen now; of a task with several filters they may be
    # another filter's (those versions kept the last one logged), so not used.
    values = data["results"].get(task) or {}
    if len({name.partition(",")[2] for name in metric_names(values)}) > 1:
        return None
    chosen_then = metric_for(values, (data.get(RUN_KEY) or {}).get("metric"))
    return scores if chosen_then == metric else None


def _score(values: dict[str, Any], metric: str, task: str, where: str) -> float:
    score = values[metric]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ConfigError(f"{where}: task {task!r} has {metric} = {score!r}, not a finite number; re-run lm-eval "
                          "for that task or leave it out of the file.")
    if not 0.0 <= score <= 1.0:
        raise ConfigError(f"{where}: task {task!r} has {metric} = {score!r}, not a score in [0, 1] (an accuracy or "
                          f"rate, whose fall is the drop); choose such a metric (`metric`, `--metric`), e.g. of "
                          f"{', '.join(m for m in metric_names(values) if m != metric) or 'none other here'}.")
    return float(score)


def _lower_is_better(data: dict[str, Any], task: str, metric: str) -> bool:
    """Whether lm-eval's results mark ``metric`` of ``task`` lower-is-better (``brier_score``, a
    perplexity): its fall is no drop. False where they do not say."""
    marks = (data.get("higher_is_better") or {}).get(task)
    return isinstance(marks, dict) and marks.get(metric.partition(",")[0]) is False


def _stderr(values: dict[str, Any], metric: str) -> float | None:
    """lm-eval's standard error of ``metric`` (``acc,none`` -> ``acc_stderr,none``); None when absent or "N/A"."""
    name, _, filt = metric.partition(",")
    value = values.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _task_names(data: dict[str, Any], groups: set[str]) -> set[str]:
    """The tasks (not groups) of an lm-eval results file: its ``results`` rows, less the groups and,
    in a file with sample counts, the rows without one."""
    counts = data.get("n-samples") or {}
    return {task for task, values in data["results"].items()
            if isinstance(values, dict) and task not in groups and (not counts or task in counts)}


def _settings_differ(before: dict[str, Any], after: dict[str, Any], tasks: Sequence[str]) -> list[str]:
    """What differs between how two lm-eval results were measured: the system instruction and whether
    a chat template was applied (and then few-shot as multi-turn), as lm-eval's CLI records them (our
    runs too), then per task the few-shot examples (``n-shot``), the questions scored (``n-samples``'
    effective count: lm-eval's ``limit``), the task's version and the prompts themselves (``task_hashes``:
    one hash of every question's document, prompt and target; another system instruction, chat template
    or few-shot draw changes it). Where either file does not record one, it is not compared."""
    found = []
    both = lambda key: key in before and key in after  # noqa: E731
    if both("system_instruction_sha") and before["system_instruction_sha"] != after["system_instruction_sha"]:
        found.append("the system instruction differs")
    templated = [d.get("chat_template_sha") is not None for d in (before, after)]
    if both("chat_template_sha") and templated[0] != templated[1]:
        found.append(f"a chat template was applied {'before' if templated[0] else 'after'} only")
    elif all(templated) and both("fewshot_as_multiturn") and before["fewshot_as_multiturn"] != after["fewshot_as_multiturn"]:
        found.append(f"fewshot_as_multiturn is {before['fewshot_as_multiturn']} before and "
                     f"{after['fewshot_as_multiturn']} after")
    for task in tasks:
        for what, value in (("n-shot", lambda d: (d.get("n-shot") or {}).get(task)),
                            ("questions", lambda d: _sample_count(d, task)),
                            ("task version", lambda d: (d.get("versions") or {}).get(task))):
            b, a = value(before), value(after)
            if b is not None and a is not None and b != a:
                found.append(f"{task} has {what} {b} before and {a} after")
    if not found:  # the prompts: only when nothing above explains why they differ
        hashes = [d.get("task_hashes") or {} for d in (before, after)]
        found += [f"{task} was asked other prompts (its task_hashes differ: another chat template, system "
                  "instruction, few-shot examples or prompt format)"
                  for task in tasks if task in hashes[0] and task in hashes[1] and hashes[0][task] != hashes[1][task]]
    return found


def _sample_count(data: dict[str, Any], task: str) -> int | None:
    counts = (data.get("n-samples") or {}).get(task)
    return counts.get("effective") if isinstance(counts, dict) else None


def _refuse_shared_categories(tasks: Sequence[str], where: str) -> None:
    categories = [category_from_task(t) for t in tasks]
    clash = [t for t, c in zip(tasks, categories) if categories.count(c) > 1]
    if clash:
        raise ConfigError(f"{where}: tasks {clash[:6]} map to one category; give lm-eval results of one benchmark "
                          "(e.g. MMLU or MMLU-Pro) per file.")


def read_lm_eval_results(path: str | os.PathLike[str], metric: str = "acc,none") -> pd.DataFrame:
    """Per-task score, standard error and sample count from an lm-eval results JSON: (category, score, stderr, n)."""
    data = read_results_json(path)
    groups = group_names(data)
    tasks = [task for task, values in data["results"].items()
             if isinstance(values, dict) and metric in values and task not in groups]
    if not tasks:
        raise ConfigError(f"{path} has no task with metric {metric!r}.")
    _refuse_shared_categories(tasks, str(path))
    return pd.DataFrame([
        {"category": category_from_task(task), "score": _score(data["results"][task], metric, task, str(path)),
         "stderr": _stderr(data["results"][task], metric), "n": _sample_count(data, task)}
        for task in tasks
    ])


def table_from_results(before: dict[str, Any], after: dict[str, Any], metric: str | dict[str, str] | None = None,
                       names: tuple[str, str] = ("The before lm-eval results", "The after lm-eval results")) -> pd.DataFrame:
    """The ground-truth table from two lm-eval results (in process, or read by ``read_results_json``);
    ``names`` say where each came from in error messages.

    One row per task (group aggregates skipped: ``group_names``, and rows without sample counts in a
    file that has them; results of different tasks, or measured otherwise, ``_settings_differ``, are a
    ConfigError); the metric is ``metric`` (or, a mapping, per task or group: ``task_metrics``), or
    per task the first of PREFERRED_METRICS it has (a task without it is a ConfigError naming its
    metrics). The drop's p-value is the paired exact McNemar test when both hold
    per-sample scores (our lm-eval runs do), else a z test on lm-eval's standard errors, else Fisher's
    exact test on the sample count (``drop_test``).
    """
    for name, data in zip(names, (before, after)):
        _check_results(data, name)
    groups = group_names(before) | group_names(after)
    tasks_b, tasks_a = _task_names(before, groups), _task_names(after, groups)
    if tasks_b != tasks_a:  # results of other task lists: a task in one file only has no drop to measure
        lone = [f"{name} has {sorted(mine - theirs)[:6]}" for name, mine, theirs
                in ((names[0], tasks_b, tasks_a), (names[1], tasks_a, tasks_b)) if mine - theirs]
        raise ConfigError(f"The two lm-eval results are of different tasks: {'; '.join(lone)}, which the other "
                          "lacks. Evaluate both models on the same task list.")
    unlike = _settings_differ(before, after, sorted(tasks_b))
    if unlike:  # a 0-shot score against a 5-shot one, or 100 questions against 1,000, is no drop
        raise ConfigError(f"{names[0]} and {names[1]} were not measured alike: {'; '.join(unlike[:6])}. Evaluate "
                          "both models with the same lm-eval settings (num_fewshot, limit, apply_chat_template, "
                          "system_instruction), lm-eval version and, with a chat template, the same template.")
    rows, unscored = [], {}
    asked = task_metrics(before, after, sorted(tasks_b), metric, f"{names[0]} and {names[1]}")
    for task, values in before["results"].items():
        if task not in tasks_b:  # a group's aggregate, or a row without a sample count
            continue
        other = after["results"][task]
        chosen = metric_for(values, asked[task])
        if chosen is None or chosen not in other:
            unscored[task] = sorted(set(metric_names(values)) & set(metric_names(other)))
            continue
        if _lower_is_better(before, task, chosen) or _lower_is_better(after, task, chosen):
            raise ConfigError(f"{names[0]} and {names[1]}: lm-eval marks {chosen} of task {task!r} lower-is-better "
                              "(its higher_is_better), so a fall would read as a gain; choose a metric whose fall is "
                              f"the drop (`metric`, `--metric`): of {task}'s, "
                              f"{[m for m in metric_names(values) if not _lower_is_better(before, task, m)]}.")
        b, a = _score(values, chosen, task, names[0]), _score(other, chosen, task, names[1])
        se_b, se_a = _stderr(values, chosen), _stderr(other, chosen)
        n = _sample_count(before, task)
        paired_b, paired_a = _per_sample(before, task, chosen), _per_sample(after, task, chosen)
        if paired_b and paired_a and set(paired_b) == set(paired_a):
            ids = sorted(paired_b)
            p, test = mcnemar_p([paired_b[i] for i in ids], [paired_a[i] for i in ids]), "mcnemar"
        else:
            p, test = drop_test(b, a, se_b, se_a, n)
        rows.append({"category": category_from_task(task), "before": b, "after": a, "n": n, "stderr_before": se_b,
                     "stderr_after": se_a, "p_value": p, "test": test if p is not None else None, "task": task,
                     "metric": chosen})
    wanted = lambda m: f"metric {m}" if m else f"any of the metrics {', '.join(PREFERRED_METRICS)}"  # noqa: E731
    if unscored:  # a task the user measured would silently be missing from the ground truth
        listed = "; ".join(f"{task} has {', '.join(found) or 'no metric'}" for task, found in list(unscored.items())[:6])
        lacking = sorted({wanted(asked[task]) for task in unscored})
        raise ConfigError(f"{names[0]} and {names[1]}: task(s) {list(unscored)[:6]} lack {' / '.join(lacking)} "
                          f"({listed}). Set `metric` (`--metric`) to one every task has, or per task or group "
                          "(`metric: {arc_challenge: acc_norm,none}`), or measure these tasks in a table of their own.")
    if not rows:
        raise ConfigError(f"{names[0]} and {names[1]} share no task with {wanted(metric)}.")
    _refuse_shared_categories([row["task"] for row in rows], f"{names[0]} and {names[1]}")
    return make_table(rows)


def scores_from_lm_eval(before: str | os.PathLike[str], after: str | os.PathLike[str],
                        metric: str | dict[str, str] | None = None) -> pd.DataFrame:
    """The ground-truth table from two lm-eval results JSON files (``table_from_results``)."""
    return table_from_results(read_results_json(before), read_results_json(after), metric, names=(str(before), str(after)))


def load_ground_truth(config: GroundTruthConfig) -> pd.DataFrame:
    """The table named by a ``GroundTruthConfig``."""
    if not config.available:
        raise ConfigError("No ground truth: set ground_truth.scores_csv or lm_eval_before / lm_eval_after.")
    for path in config.files():
        if not Path(path).is_file():
            raise ConfigError(f"Ground-truth file {path} does not exist.")
    if config.scores_csv:
        return read_scores_csv(config.scores_csv)
    return scores_from_lm_eval(str(config.lm_eval_before), str(config.lm_eval_after))


def scores_dict(table: pd.DataFrame) -> tuple[dict[str, float], dict[str, float]]:
    """(before, after) per category, from a table."""
    return (dict(zip(table["category"], table["before"].astype(float))),
            dict(zip(table["category"], table["after"].astype(float))))


# ----------------------------------------------------------------------------- drops and their tests


def mcnemar_p(before: Sequence[float], after: Sequence[float]) -> float:
    """One-sided exact McNemar p-value of 'after is worse than before' on paired 0/1 outcomes."""
    worse = sum(1 for b, a in zip(before, after) if b > a)
    better = sum(1 for b, a in zip(before, after) if b < a)
    n = worse + better
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n


def z_test_p(before: float, after: float, stderr_before: float | None, stderr_after: float | None) -> float | None:
    """One-sided p-value of 'after < before' from the two standard errors (normal approximation, as
    for lm-eval's large tasks); None when either is unknown (use ``fisher_drop_p`` with the counts)."""
    if stderr_before is None or stderr_after is None or pd.isna(stderr_before) or pd.isna(stderr_after):
        return None
    se = math.sqrt(stderr_before**2 + stderr_after**2)
    if se == 0:
        return 0.0 if before > after else 1.0
    return 0.5 * math.erfc((before - after) / se / math.sqrt(2))


def fisher_drop_p(before: float, after: float, n_before: int, n_after: int | None = None) -> float:
    """One-sided Fisher exact p-value of 'after < before' for two accuracies (or rates) measured on
    ``n_before`` and ``n_after`` items (``n_after`` defaults to ``n_before``): the counts are the
    rates times the item numbers, rounded. Exact at any size, where a normal approximation is not:
    32 of 32 questions right before and 28 after gives 0.057, the z test 0.019."""
    n_after = n_before if n_after is None else n_after
    for name, count in (("n_before", n_before), ("n_after", n_after)):
        if isinstance(count, bool) or int(count) != count or count < 1:
            raise ValueError(f"{name} must be a whole number of items >= 1, got {count!r}.")
    for name, rate in (("before", before), ("after", after)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be a rate in [0, 1], got {rate!r}.")
    n_before, n_after = int(n_before), int(n_after)
    right_before, right_after = round(before * n_before), round(after * n_after)
    return hypergeometric_sf(right_before, n_before + n_after, right_before + right_after, n_before)


def drop_test(before: float, after: float, stderr_before: float | None = None, stderr_after: float | None = None,
              n: float | None = None) -> tuple[float | None, str | None]:
    """(p-value, test name) of 'after < before' from what a ground truth knows besides the two
    scores: the z test on both standard errors, else Fisher's exact test on ``n`` items each, else
    (None, None). Paired per-item outcomes are better still: ``mcnemar_p``."""
    p = z_test_p(before, after, stderr_before, stderr_after)
    if p is not None:
        return p, "z"
    if n is not None and not pd.isna(n) and n >= 1:
        return fisher_drop_p(before, after, int(n)), "fisher"
    return None, None


def make_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A full table from rows with at least category, before, after, n: ``drop`` added, then
    ``stderr_before, stderr_after, p_value, test`` (None where unknown), then any extra columns."""
    frame = pd.DataFrame(list(rows))
    frame["drop"] = frame["before"] - frame["after"]
    for column in TABLE_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    extra = [c for c in frame.columns if c not in TABLE_COLUMNS]
    return frame[TABLE_COLUMNS + extra]


