"""The ``ground_truth`` section of ``mneme run`` and its stage: named ground-truth tables, each read
from files or measured by running lm-eval or the LLM judge on the run's base and edited models.

A run evaluates MNEME once per table, against the taxonomy the table's categories belong to (the
EM case: an MMLU-Pro table and an EM-judge table at once). The stage writes every table, in the
one table format (``groundtruth.table``), to ``ground_truth/<name>.csv`` of the run directory, with
each measurement's own files (results JSON, answers, judgements) in ``ground_truth/<name>/`` so an
interrupted measurement resumes. What a measurement computes per model is also kept in the run's
``cache/ground_truth/`` by content: lm-eval's results by their ``run_key`` (``harness``), the judge's
answers by their ``answers_key`` and the judge's calls by their prompt (``judge``), so a stage redone
because the edited model changed does not measure, or answer and judge, the base model again.
``scores_csv`` / ``lm_eval_before`` / ``lm_eval_after`` at the top level remain the single table of
earlier configs (read by ``evaluate`` directly, no stage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.config import ConfigMixin, require
from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.harness import LMEvalConfig
from mneme_plugin.groundtruth.judge import JudgeConfig
from mneme_plugin.groundtruth.table import GroundTruthConfig, load_ground_truth, read_scores_csv, save_scores


def _with_preset(value: Any, kind: str) -> Any:
    """A nested mapping with a ``preset`` key: the shipped preset's (of ``kind``) keys, overridden by the others."""
    if isinstance(value, dict) and "preset" in value:
        from mneme_plugin.presets import merged_config

        rest = dict(value)
        return merged_config(rest.pop("preset"), rest, kind)
    return value


@dataclass
class GroundTruthTable(ConfigMixin):
    """One ground-truth table: exactly one source (``scores_csv``, the lm-eval JSON pair, ``lm_eval``
    or ``judge``) and the ``taxonomy`` its categories belong to (default: the run's first).

    ``lm_eval`` / ``judge`` take the keys of ``mneme groundtruth lm-eval`` / ``judge`` configs (and
    ``preset: NAME``); their ``base`` / ``edited`` default to the run's models. ``categories``
    renames table categories to taxonomy ids (e.g. HEx-PHI's ``category_1`` to ``illegal_activity``):
    each key a category of the table, no two onto one (``renamed_categories``).
    """

    taxonomy: str | None = None
    scores_csv: str | None = None
    lm_eval_before: str | None = None
    lm_eval_after: str | None = None
    lm_eval: LMEvalConfig | None = None
    judge: JudgeConfig | None = None
    categories: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, section: str | None = None) -> "GroundTruthTable":
        if isinstance(data, dict):
            data = {k: (_with_preset(v, k) if k in ("lm_eval", "judge") else v) for k, v in data.items()}
        return super().from_dict(data, section=section)

    def __post_init__(self) -> None:
        require((self.lm_eval_before is None) == (self.lm_eval_after is None),
                "lm_eval_before and lm_eval_after go together.")
        sources = [self.scores_csv is not None, self.lm_eval_before is not None, self.lm_eval is not None,
                   self.judge is not None]
        require(sum(sources) == 1, "A ground-truth table needs exactly one source: scores_csv, "
                "lm_eval_before + lm_eval_after, lm_eval or judge.")

    @property
    def measured(self) -> bool:
        """Whether the run measures it (lm-eval or judge) rather than reading files."""
        return self.lm_eval is not None or self.judge is not None

    def files(self) -> list[str]:
        return [p for p in (self.scores_csv, self.lm_eval_before, self.lm_eval_after) if p]

    def measurement_inputs(self) -> list[str]:
        """The local files and folders a measured table reads besides the models: the judge's
        questions file, lm-eval's ``include_path`` task folders."""
        found = list(self.lm_eval.include_path) if self.lm_eval is not None else []
        if self.judge is not None and self.judge.questions:
            found.append(self.judge.questions)
        return found


@dataclass
class RunGroundTruthConfig(GroundTruthConfig):
    """``GroundTruthConfig`` (one table read from files) plus ``tables``: named tables, measured or read."""

    tables: dict[str, GroundTruthTable] = field(default_factory=dict)
    # Runs made before named tables existed keep their evaluate fingerprint.
    later_fields = ("tables",)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(not (self.tables and super().available),
                "Give ground_truth.tables or the single scores_csv / lm-eval pair, not both.")
        for name in self.tables:
            require(bool(name) and "/" not in name and not name.startswith("."),
                    f"ground_truth.tables: {name!r} is not usable as a file name.")

    @property
    def available(self) -> bool:
        return bool(self.tables) or super().available

    @property
    def measured(self) -> bool:
        return any(t.measured for t in self.tables.values())

    def files(self) -> list[str]:
        return super().files() + [p for t in self.tables.values() for p in t.files()]

    def measurement_inputs(self) -> list[str]:
        """Every table's ``GroundTruthTable.measurement_inputs``."""
        return [p for t in self.tables.values() for p in t.measurement_inputs()]


def table_path(folder: str | os.PathLike[str], name: str) -> Path:
    """Where the stage writes table ``name`` (``ground_truth/<name>.csv``)."""
    return Path(folder) / f"{name}.csv"


def measure_tables(config: RunGroundTruthConfig, base: str, edited: str, out_dir: str | os.PathLike[str],
                   cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Build every table of ``config.tables`` into ``out_dir`` (``<name>.csv``; measurements in
    ``<name>/``, resumed from what is there). ``base`` / ``edited``: the run's models. ``cache_dir``:
    where lm-eval's results and the judge's answers and calls are kept by their key across redone
    stages (``harness.lm_eval_ground_truth``, ``judge.judge_ground_truth``)."""
    from mneme_plugin.groundtruth.harness import lm_eval_ground_truth
    from mneme_plugin.groundtruth.judge import judge_ground_truth, read_questions
    from mneme_plugin.groundtruth.table import scores_from_lm_eval

    problems = categories_problems(config)
    if problems:
        raise ConfigError(" ".join(problems))
    out = Path(out_dir)
    written = []
    for name, table in config.tables.items():
        work = out / name
        left_out: set[str] = set()
        if table.lm_eval is not None:
            cfg = table.lm_eval.replace(base=table.lm_eval.base or base, edited=table.lm_eval.edited or edited)
            scores = lm_eval_ground_truth(cfg, work, cache_dir=cache_dir)
        elif table.judge is not None:
            cfg = table.judge.replace(base=table.judge.base or base, edited=table.judge.edited or edited)
            scores = judge_ground_truth(cfg, work, cache_dir=cache_dir)
            if table.categories:  # a question category with no scorable answer is left out of the table
                # (with a warning): its rename is no typo
                left_out = {q.category for q in read_questions(cfg)}
        elif table.scores_csv:
            scores = read_scores_csv(table.scores_csv)
        else:
            scores = scores_from_lm_eval(str(table.lm_eval_before), str(table.lm_eval_after))
        if table.categories:
            scores = renamed_categories(scores, table.categories, f"ground_truth.tables.{name}.categories",
                                        left_out=left_out)
        written.append(save_scores(scores, table_path(out, name)))
    return written


def renamed_categories(scores: pd.DataFrame, renames: dict[str, str], where: str,
                       left_out: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """``scores`` with its categories renamed by ``renames`` (table category -> taxonomy id); a
    ConfigError prefixed by ``where`` for what ``rename_problems`` finds."""
    present = [str(c) for c in scores["category"]]
    tasks = dict(zip(scores["task"].astype(str), present)) if "task" in scores.columns else {}
    problems = rename_problems(present, renames, left_out, tasks)
    if problems:
        raise ConfigError(" ".join(f"{where}: {p}" for p in problems))
    return scores.assign(category=[renames.get(c, c) for c in present])


def rename_problems(present: list[str], renames: dict[str, str], left_out: set[str] | frozenset[str] = frozenset(),
                    tasks: dict[str, str] | None = None) -> list[str]:
    """What is wrong with renaming the categories ``present`` by ``renames``: a key that names none
    (a typo, or an lm-eval task name such as ``mmlu_anatomy`` for its category ``anatomy``: ``tasks``,
    task -> category, says which) unless it is in ``left_out`` (a category the measurement knows but
    left out of this table, e.g. a judge category without a scorable answer), and two categories
    renamed onto one: a category is one row (one lm-eval task, one judge category), its questions
    never pooled with another's."""
    tasks = tasks or {}
    unknown = [key for key in renames if key not in present and key not in left_out]
    if unknown:
        hint = "".join(f"; {key} is the lm-eval task of category {tasks[key]!r}" for key in unknown if key in tasks)
        return [f"{unknown[:6]} name no category of the table{hint}. Its categories: "
                f"{present[:10]}{'...' if len(present) > 10 else ''}."]
    renamed = [renames.get(c, c) for c in present]
    merged = {c: [old for old, new in zip(present, renamed) if new == c] for c in renamed if renamed.count(c) > 1}
    if merged:
        listed = "; ".join(f"{sources} onto {target!r}" for target, sources in list(merged.items())[:5])
        return [f"renames several categories onto one ({listed}). Each category is one row, its own questions: "
                "rename one of them only, or map the others to other taxonomy ids."]
    return []


def categories_problems(config: RunGroundTruthConfig, default_taxonomy: str | None = None) -> list[str]:
    """What is wrong with the tables' categories, found before any model is evaluated, so a typo does
    not surface only after hours of lm-eval: of an lm-eval table, from lm-eval's task index
    (``harness.planned_tasks``), two tasks that map to one category (``tasks: [mmlu_pro, mmlu]``: two
    ``philosophy`` rows), ``categories`` keys that fit no task (``rename_problems``) and, when its
    taxonomy is known, no category of that taxonomy at all; of every table, a ``categories`` target that is
    no id of its taxonomy (the row would land outside it, unscored). The taxonomy of a table is its own
    ``taxonomy`` or ``default_taxonomy`` (the run's first); an lm-eval table whose tasks the index cannot
    tell is checked once measured."""
    from mneme_plugin.groundtruth.harness import planned_tasks
    from mneme_plugin.groundtruth.table import category_from_task

    problems: list[str] = []
    lm_eval_installed = True
    for name, table in config.tables.items():
        where = f"ground_truth.tables.{name}"
        taxonomy = table.taxonomy or default_taxonomy
        ids = _taxonomy_ids(taxonomy)
        if ids is not None:
            problems += [f"{where}.categories: {p}" for p in _target_problems(table.categories, ids, str(taxonomy))]
        if table.lm_eval is None or not lm_eval_installed:
            continue
        try:
            tasks = planned_tasks(table.lm_eval)
        except ImportError:  # lm-eval not installed: measuring the table says how to install it
            lm_eval_installed = False
            continue
        if tasks is None:
            continue
        present = [category_from_task(t) for t in tasks]
        clash = {c: [t for t, p in zip(tasks, present) if p == c] for c in present if present.count(c) > 1}
        if clash:
            listed = "; ".join(f"{ts} -> {c!r}" for c, ts in list(clash.items())[:4])
            problems.append(f"{where}.lm_eval: tasks map to one category ({listed}): one row per category, so "
                            "measure each benchmark (e.g. MMLU and MMLU-Pro) as its own table of ground_truth.tables.")
            continue
        renaming = rename_problems(present, table.categories, tasks=dict(zip(tasks, present)))
        problems += [f"{where}.categories: {p}" for p in renaming]
        renamed = {table.categories.get(c, c) for c in present}
        if not renaming and ids is not None and not renamed & ids:
            problems.append(f"{where}: none of its categories ({sorted(renamed)[:5]}"
                            f"{'...' if len(renamed) > 5 else ''}) is an id of taxonomy {taxonomy!r}: rename them "
                            "with the table's `categories` mapping or set the table's `taxonomy`.")
    return problems


def _taxonomy_ids(taxonomy: str | None) -> set[str] | None:
    """The ids of ``taxonomy``; None when it is not given or does not load (its own check names it)."""
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    if taxonomy is None:
        return None
    try:
        return set(load_taxonomy(taxonomy).ids())
    except ConfigError:
        return None


def _target_problems(renames: dict[str, str], ids: set[str], taxonomy: str) -> list[str]:
    """``categories`` targets that are no id of the taxonomy, with the ids closest to each."""
    import difflib

    wrong = [target for target in renames.values() if target not in ids]
    if not wrong:
        return []
    hints = {t: difflib.get_close_matches(t, sorted(ids), n=3) for t in wrong}
    return [f"{wrong[:6]} are no ids of taxonomy {taxonomy!r}"
            + "".join(f"; close to {t}: {h}" for t, h in hints.items() if h)
            + f". A renamed category must be one of its ids (`mneme taxonomies {taxonomy}` lists them)."]


def load_tables(config: GroundTruthConfig, folder: str | os.PathLike[str],
                default_taxonomy: str) -> dict[str, tuple[str, pd.DataFrame]]:
    """name -> (taxonomy, table) for every ground truth of a run: the named tables as the stage wrote
    them into ``folder``; the single table of earlier configs as ``ground_truth`` with the default taxonomy."""
    tables = getattr(config, "tables", None) or {}
    if not tables:
        return {"ground_truth": (default_taxonomy, load_ground_truth(config))}
    out = {}
    for name, table in tables.items():
        path = table_path(folder, name)
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: run the ground_truth stage first (`mneme run --only ground_truth`).")
        out[name] = (table.taxonomy or default_taxonomy, read_scores_csv(path))
    return out
