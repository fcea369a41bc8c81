"""Ground truth from lm-evaluation-harness: per-category benchmark accuracy before and after an edit.

``lm_eval.simple_evaluate`` runs in process on the base and the edited model for a task list
(``mmlu_<subject>``, ``mmlu_pro_<category>``, ``wmdp_bio|chem|cyber``, any registered task, or a
user's task YAML found through ``include_path``). Each model's results are saved as soon as they
exist, with the ``run_key`` they depend on (a rerun with the same key skips them), and lm-eval's
request cache (``use_cache``, one SQLite file per model and run key: lm-eval keys its entries by the
request alone, not by the model answering it) keeps every answered model call, so an interrupted run
resumes. With a ``cache_dir`` (``mneme run``: the run's ``cache/ground_truth/``), each
model's results are also kept there under a digest of their key, and found there by a later
measurement with the same key into a fresh folder: a run whose ground-truth stage is redone (another
edited model) does not measure an unchanged base model again. Each task's share of them is kept there
too, under the key of that task alone, so a task list that grows measures only the tasks it adds
(``_assembled_from_tasks``). Results JSON files produced elsewhere
(``lm_eval --output_path``) are read by ``table.read_results_json`` / ``table_from_results``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mneme_plugin.devices import check_device_name
from mneme_plugin.config import ConfigMixin, Seed, require
from mneme_plugin.errors import ConfigError
from mneme_plugin.groundtruth.table import (  # the results readers live with the table format
    PER_SAMPLE_KEY, RUN_KEY, SCORES_CSV, metric_names, read_results_json, save_scores, scores_from_lm_eval,
    start_measurement, table_from_results,
)
from mneme_plugin.files import atomic_write_text, data_file_rows, json_digest

logger = logging.getLogger("mneme_plugin")

RESULTS_JSON = {"before": "lm_eval_before.json", "after": "lm_eval_after.json"}
CACHE_DIR = "cache"
CONFIG_FILE = "lm_eval_config.yaml"
# In a ``cache_dir``: ``lm_eval_results/<digest of the run key>.json``, one model's results.
RESULTS_CACHE = "lm_eval_results"
# ... and ``lm_eval_results/tasks/<digest of a one-task run key>.json``, one task's share of them, so that
# another task list measures only the tasks it adds (``_assembled_from_tasks``).
TASK_RESULTS_CACHE = "tasks"
# The entries of lm-eval's results that map a task to its own values (plus ours): a task's share of a results file.
PER_TASK_KEYS = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "task_hashes",
                 PER_SAMPLE_KEY)


@dataclass
class LMEvalConfig(ConfigMixin):
    """lm-eval ground truth.

    Attributes:
        base / edited: HF model names or folders (lm-eval's ``hf`` model).
        tasks: lm-eval task (or group) names.
        include_path: folder(s) of extra task YAMLs (lm-eval's ``--include_path``).
        include_defaults: also index lm-eval's own tasks (False is faster when every task is local).
        metric: the lm-eval metric key (e.g. ``acc,none``), or a mapping of task or group names to keys
            (``{arc_challenge: acc_norm,none}``: the others as with None); None picks per task from
            PREFERRED_METRICS.
        apply_chat_template: render prompts with the model's chat template (instruction-tuned models).
        system_instruction: a system prompt lm-eval puts before every question (lm-eval's ``--system_instruction``).
        fewshot_as_multiturn: with ``apply_chat_template``, few-shot examples as chat turns (True) or in
            one user turn (False); None keeps lm-eval's default (True from lm-eval 0.4.10).
        gen_kwargs: generation settings of the generative tasks over their YAML's ``generation_kwargs``
            (lm-eval's ``--gen_kwargs``), e.g. ``{max_gen_toks: 1024}`` for MMLU-Pro's chains of thought.
        model_args: extra lm-eval ``hf`` model arguments (e.g. ``{trust_remote_code: true}``).
        confirm_run_unsafe_code: let lm-eval run tasks that execute model-written code (HumanEval, MBPP;
            lm-eval's ``--confirm_run_unsafe_code``). It decides whether they run, not what they measure.
    """

    base: str = ""
    edited: str = ""
    tasks: list[str] = field(default_factory=list)
    include_path: list[str] = field(default_factory=list)
    include_defaults: bool = True
    num_fewshot: int | None = None
    batch_size: int | str = 8
    limit: int | float | None = None
    metric: str | dict[str, str] | None = None
    device: str = "auto"
    dtype: str = "auto"
    apply_chat_template: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    seed: Seed = 0
    system_instruction: str | None = None
    fewshot_as_multiturn: bool | None = None
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    confirm_run_unsafe_code: bool = False
    # Added later: at their default they leave run keys (and results measured before) unchanged.
    later_fields = ("system_instruction", "fewshot_as_multiturn", "gen_kwargs", "confirm_run_unsafe_code")
    # No runtime_fields: `batch_size` and `device` stay in `mneme run`'s fingerprint (a change redoes the
    # ground_truth stage and those after it). `device` decides the dtype `auto` loads the models in, and a
    # forward batch's padding can change a generative task's greedy text, not only a log-likelihood's
    # last bits; and leaving them out now would change the fingerprint of every run measured so far
    # (runtime fields leave result_dict whatever their value). The redone stage costs little: `run_key`
    # leaves `batch_size` out, so lm-eval's results come back from the run's cache unless the dtype changed.

    def __post_init__(self) -> None:
        check_device_name(self.device)
        self.tasks = [self.tasks] if isinstance(self.tasks, str) else [str(t) for t in self.tasks]
        self.include_path = ([self.include_path] if isinstance(self.include_path, str)
                             else [str(p) for p in self.include_path])
        require(self.num_fewshot is None or self.num_fewshot >= 0, "num_fewshot must be None or >= 0.")
        require(self.limit is None or self.limit > 0, "limit must be None or > 0.")
        require(not (self.fewshot_as_multiturn and not self.apply_chat_template),
                "fewshot_as_multiturn: true needs apply_chat_template: true (it makes the few-shot examples chat "
                "turns); drop it or set apply_chat_template.")
        require(self.system_instruction is None or bool(self.system_instruction.strip()),
                "system_instruction is empty: give the system prompt, or leave it out.")

    def check_ready(self) -> None:
        require(bool(self.base) and bool(self.edited), "lm-eval ground truth needs `base` and `edited` models.")
        require(bool(self.tasks), "lm-eval ground truth needs `tasks` (e.g. [mmlu_anatomy, wmdp_bio]).")


def run_key(config: LMEvalConfig, model: str) -> dict[str, Any]:
    """What a saved result depends on: a rerun reuses it only when this is unchanged. The config
    (less the models; ``batch_size``, so that results measured at one batch size serve another, e.g. a
    run resumed with a smaller batch after running out of memory, knowingly: it changes log-likelihoods
    in their last bits, a generative task's greedy text rarely; ``device``, whose effect, the dtype, is in
    the key; ``confirm_run_unsafe_code``; and ``metric``, which only chooses what is read from results
    that keep every metric's per-question scores. The stage's fingerprint does hold ``batch_size`` and
    ``device``: see ``LMEvalConfig``), with ``dtype`` as the models are loaded in (``auto`` is bfloat16
    on a GPU and float32 elsewhere: a result measured on one is not the other's), the model's name, and
    what names alone do not tell: a local model folder's weights (``activations.models.weights_digest``:
    a local folder's file metadata, weights saved over it, e.g. a redone intervention's ``edited_model/``,
    change it; a hub id's commit in the local hub cache, for the ``revision`` in ``model_args``), each
    ``include_path`` folder's files (their paths, sizes and times: ``files.stat_digest``; an edited task
    YAML changes them) and lm-eval's version (its tasks' prompts change between versions)."""
    from mneme_plugin.activations.models import weights_digest
    from mneme_plugin.files import stat_digest

    # `metric` only chooses what is read from the results (they keep every metric's per-sample scores).
    key = {k: v for k, v in config.result_dict().items()
           if k not in ("base", "edited", "batch_size", "device", "metric", "confirm_run_unsafe_code")}
    key["dtype"] = _model_args(config, model)["dtype"]
    key["model"] = model
    key["model_files"] = weights_digest(model, config.model_args.get("revision"))
    # lm-eval imports a task's `!function` code from its folder, which writes __pycache__ there.
    key["include_path_files"] = {f: stat_digest(f, skip_dirs=("__pycache__",)) for f in config.include_path}
    key["lm_eval_version"] = library_version("lm_eval")
    return json.loads(json.dumps(key))


def library_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None when it is not installed): part of the cache keys of
    what a library computes (lm-eval's results, the judge's generated answers), so an upgrade recomputes."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def task_manager(config: LMEvalConfig) -> Any:
    """lm-eval's TaskManager, after checking the task list (``task_problems``)."""
    manager, problems = _manager_and_problems(config)
    if problems:
        raise ConfigError(" ".join(problems))
    return manager


def task_problems(config: LMEvalConfig) -> list[str]:
    """What lm-eval would refuse in ``config.tasks``, found from its task index alone (offline, no model
    or dataset loaded): a task it does not know, and a task listed twice, on its own and inside a group
    (or tag) also listed, which lm-eval refuses as a duplicate only once a model is loaded."""
    return _manager_and_problems(config)[1]


def _manager_and_problems(config: LMEvalConfig) -> tuple[Any, list[str]]:
    import difflib

    for folder in config.include_path:
        if not Path(folder).is_dir():
            raise ConfigError(f"include_path {folder} is not a folder of lm-eval task YAMLs.")
    manager = _indexed_tasks(config)
    known = set(manager.all_tasks)
    unknown = [t for t in config.tasks if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, list(known), n=3) for t in unknown}
        return manager, [f"lm-eval does not know task(s) {unknown}"
                         + "".join(f"; close to {t}: {h}" for t, h in hints.items() if h)
                         + ". Check the names (`lm_eval ls tasks`) or add the folder of your task YAML to include_path."]
    listed: dict[str, str] = {}  # leaf task -> the listed name it comes from
    problems = []
    for name in config.tasks:
        for leaf in sorted(_leaf_tasks(manager, name)):
            if leaf in listed and listed[leaf] != name:
                inside = [n for n in (listed[leaf], name) if n != leaf]
                problems.append(f"lm-eval task {leaf} is listed twice in tasks: {listed[leaf]!r} and {name!r}"
                                f"{' (a group or tag that contains it: ' + ', '.join(inside) + ')' if inside else ''};"
                                " lm-eval refuses a task requested twice. List the group or its tasks, not both.")
                break
            listed[leaf] = name
    return manager, problems


# lm-eval's task index per (include_path and its files, include_defaults): indexing its ~15k own tasks
# takes seconds, and a run checks its task lists before the first stage and again in the stage.
_TASK_INDEXES: dict[tuple[Any, ...], Any] = {}


def _indexed_tasks(config: LMEvalConfig) -> Any:
    """lm-eval's TaskManager for ``config``'s include_path and include_defaults, built once per process
    while the include_path folders' files are unchanged (``files.stat_digest``)."""
    from lm_eval.tasks import TaskManager

    from mneme_plugin.files import stat_digest

    key = (tuple(config.include_path), config.include_defaults,
           tuple(stat_digest(f, skip_dirs=("__pycache__",)) for f in config.include_path))
    if key not in _TASK_INDEXES:
        _TASK_INDEXES[key] = TaskManager(include_path=config.include_path or None,
                                         include_defaults=config.include_defaults)
    return _TASK_INDEXES[key]


def _leaf_tasks(manager: Any, name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The tasks ``name`` (a task, group or tag) runs, from lm-eval's task index (a group's `task:`
    list, a tag's members). An index entry of a shape this does not know counts as one task."""
    entry = getattr(manager, "task_index", {}).get(name)
    kind = getattr(getattr(entry, "kind", None), "name", None)
    if kind == "GROUP":
        members = [t if isinstance(t, str) else t.get("task") for t in (getattr(entry, "cfg", None) or {}).get("task", [])]
    elif kind == "TAG":
        members = list(getattr(entry, "tags", None) or [])
    else:
        return {name}
    leaves: set[str] = set()
    for member in members:
        if isinstance(member, str) and member not in seen:
            leaves |= _leaf_tasks(manager, member, seen | {name})
    return leaves or {name}


def planned_tasks(config: LMEvalConfig) -> list[str] | None:
    """The tasks lm-eval will run for ``config.tasks`` (groups and tags expanded through its task
    index, offline, no model loaded), sorted; None when the index cannot tell: a name it does not
    know, or a member that is not an indexed task (a group's inline task, which lm-eval renames), or
    an ``include_path`` that is no folder (``task_problems`` names it)."""
    if not all(Path(folder).is_dir() for folder in config.include_path):
        return None
    manager = _indexed_tasks(config)
    index = getattr(manager, "task_index", {})
    leaves = set().union(*(_leaf_tasks(manager, name) for name in config.tasks))
    kinds = {getattr(getattr(index.get(leaf), "kind", None), "name", None) for leaf in leaves}
    return sorted(leaves) if kinds <= {"TASK", "PY_TASK"} else None


# lm-eval's `dataset_path` values that read local files through `dataset_kwargs.data_files` (datasets' builders).
LOCAL_DATA_BUILDERS = ("json", "csv", "parquet")


def local_task_size(config: LMEvalConfig, task: str) -> int | None:
    """How many documents lm-eval evaluates for ``task`` (one indexed task, not a group) when its YAML reads
    local data files (``dataset_path: json``, ``csv`` or ``parquet`` with ``dataset_kwargs.data_files``):
    the rows of the split it evaluates (``test_split``, else ``validation_split``), before ``limit`` and
    any ``process_docs``. None when it reads a hub dataset or the files cannot be counted (missing, a
    glob, another format)."""
    entry = getattr(_indexed_tasks(config), "task_index", {}).get(task)
    settings = getattr(entry, "cfg", None) or {}
    builder = settings.get("dataset_path")
    if builder not in LOCAL_DATA_BUILDERS:
        return None
    files = (settings.get("dataset_kwargs") or {}).get("data_files")
    split = settings.get("test_split") or settings.get("validation_split")
    if isinstance(files, dict):
        files = files.get(split)
    elif split != "train":  # datasets names the split of files given without one "train"
        return None
    files = [files] if isinstance(files, str) else files
    if not files or not all(isinstance(f, str) for f in files):
        return None
    counts = [data_file_rows(Path(f), builder) for f in files]
    return None if None in counts else sum(counts)


def _model_args(config: LMEvalConfig, model: str) -> dict[str, Any]:
    """lm-eval's ``hf`` model arguments: ``dtype`` resolved (``auto``: bfloat16 on CUDA, float32
    elsewhere), ``model_args`` over them."""
    from mneme_plugin.devices import resolve_device

    device = resolve_device(config.device)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return {"pretrained": model, "dtype": dtype, "device": str(device), **config.model_args}


def run_lm_eval(config: LMEvalConfig, model: str, cache: Path, manager: Any) -> dict[str, Any]:
    """lm-eval's results for one model: its results dict (JSON-safe) plus per-sample scores."""
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError("lm-eval ground truth needs lm-evaluation-harness: pip install 'mneme-plugin[eval]'.") from err
    from mneme_plugin.activations.models import hub_cache_when_unreachable

    revision = config.model_args.get("revision")  # the model was checked before either was evaluated
    cache.parent.mkdir(parents=True, exist_ok=True)
    from lm_eval.loggers import EvaluationTracker

    # Optional settings go to lm-eval only when set, so its own defaults (which vary by version) apply otherwise.
    optional = {"system_instruction": config.system_instruction, "gen_kwargs": config.gen_kwargs or None,
                "fewshot_as_multiturn": config.fewshot_as_multiturn}
    tracker = EvaluationTracker()  # records what the prompts were built with, as lm-eval's CLI does
    # lm-eval loads through transformers, in this process.
    with hub_cache_when_unreachable(model, revision), _quiet_git_probe():
        try:
            out = lm_eval.simple_evaluate(
                model="hf", model_args=_model_args(config, model), tasks=list(config.tasks),
                num_fewshot=config.num_fewshot, batch_size=config.batch_size, limit=config.limit,
                use_cache=str(cache), log_samples=True, apply_chat_template=config.apply_chat_template,
                task_manager=manager, random_seed=config.seed, numpy_random_seed=config.seed,
                torch_random_seed=config.seed, fewshot_random_seed=config.seed, evaluation_tracker=tracker,
                confirm_run_unsafe_code=config.confirm_run_unsafe_code,
                **{k: v for k, v in optional.items() if v is not None},
            )
        except ConnectionError as err:  # `datasets` could not reach the hub for a task's data
            raise ConfigError(
                f"lm-eval could not fetch a task's data set: {str(err).splitlines()[0].rstrip('.')}. Offline, the data sets must be "
                "in the local datasets cache (run the tasks once with a network; HF_DATASETS_OFFLINE=1 then reads "
                "the cache), or use task YAMLs whose data are local files (include_path).") from err
        except ValueError as err:
            if "confirm_run_unsafe_code" not in str(err):
                raise
            raise ConfigError(f"{err} In the lm-eval config: `confirm_run_unsafe_code: true` (the task executes "
                              "code the model writes: run it in a sandbox).") from err
    if out is None:
        raise ConfigError("lm-eval returned no results (a non-zero rank of a distributed run?).")
    samples = out.pop("samples", {}) or {}
    out.update(_prompt_records(tracker, samples))
    per_sample: dict[str, dict[str, dict[str, float]]] = {}
    for task, records in samples.items():
        # lm-eval logs one record per document and filter (`strict-match`, `flexible-extract`): each metric
        # keeps its own filter's scores, so any metric can be chosen later without running lm-eval again.
        for metric in metric_names(out["results"].get(task) or {}):
            name, _, filt = metric.partition(",")
            chosen = [r for r in records if r.get("filter", "none") == (filt or "none")
                      and isinstance(r.get(name), (int, float))]
            if chosen:
                per_sample.setdefault(task, {})[metric] = {str(r["doc_id"]): float(r[name]) for r in chosen}
    safe = json.loads(json.dumps(out, default=str))
    safe[PER_SAMPLE_KEY] = per_sample
    return safe


@contextmanager
def _quiet_git_probe() -> Iterator[None]:
    """lm-eval records the git commit of the working directory (``git describe``), and git prints ``fatal: not
    a git repository`` outside one: once per model, alarming and of no use here. Its probe runs with file
    descriptor 2 sent to the null device; lm-eval's own logging and progress bars are untouched."""
    import lm_eval.evaluator as evaluator

    probe = getattr(evaluator, "get_git_commit_hash", None)
    if probe is None:  # another lm-eval version: nothing to quiet
        yield
        return

    def quiet() -> Any:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
                return probe()
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


def _prompt_records(tracker: Any, samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What lm-eval's CLI adds to a results file about the prompts: its run settings (system instruction,
    chat template and their hashes, few-shot as multi-turn) and ``task_hashes``, per task one hash of every
    question's document, prompt and target hashes, so two files whose models were asked other prompts
    can be told apart (``table._settings_differ``)."""
    from dataclasses import asdict

    from lm_eval.utils import hash_string

    settings = ("system_instruction", "system_instruction_sha", "fewshot_as_multiturn", "chat_template",
                "chat_template_sha")
    records: dict[str, Any] = {k: v for k, v in asdict(tracker.general_config_tracker).items() if k in settings}
    hashes = {}
    for task, records_of_task in samples.items():
        parts = [(r.get("doc_hash"), r.get("prompt_hash"), r.get("target_hash")) for r in records_of_task]
        if parts and all(isinstance(p, str) for part in parts for p in part):
            hashes[task] = hash_string("".join("".join(part) for part in parts))
    records["task_hashes"] = hashes
    return records


def cached_results_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """Where ``cache_dir`` keeps the results of the measurement ``key`` (``run_key``) names."""
    return Path(cache_dir) / RESULTS_CACHE / f"{json_digest(key, length=32)}.json"


def _saved_results(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The results JSON at ``path`` when it was measured with ``key``; None when absent, of another
    key (an older version's key, too), or unreadable (a crash; measured again)."""
    if not path.is_file():
        return None
    try:
        data = read_results_json(path)
    except ConfigError as err:
        logger.warning("lm-eval: %s; measured again.", err)
        return None
    saved = dict(data.get(RUN_KEY) or {})
    saved.pop("metric", None)  # an earlier version's key held it; results of one metric are still results
    return data if saved == key else None


def _task_share(cache_dir: str | Path, key: dict[str, Any], task: str) -> tuple[Path, dict[str, Any]]:
    """Where ``cache_dir`` keeps ``task``'s share of the results measured with run key ``key``, and the
    share's own key: ``key`` for that task alone (``run_key`` depends on the task list only through
    ``tasks``)."""
    task_key = {**key, "tasks": [task]}
    return Path(cache_dir) / RESULTS_CACHE / TASK_RESULTS_CACHE / f"{json_digest(task_key, length=32)}.json", task_key


def _keep_task_shares(data: dict[str, Any], cache_dir: str | Path, key: dict[str, Any]) -> None:
    """Each task of ``data`` (one model's results, measured with run key ``key``; groups left out) into
    ``cache_dir`` by its own key, unless kept there already (a share's file is named by its key's
    digest and written atomically: one that exists is that key's)."""
    from mneme_plugin.groundtruth.table import group_names

    groups = group_names(data)
    shared = {k: v for k, v in data.items() if k not in PER_TASK_KEYS and k not in ("groups", "group_subtasks", RUN_KEY)}
    for task in data.get("n-samples") or {}:
        if task in groups or task not in data["results"]:
            continue
        target, task_key = _task_share(cache_dir, key, task)
        if not target.is_file():
            share = {**shared, **{k: {task: data[k][task]} for k in PER_TASK_KEYS if task in (data.get(k) or {})}}
            atomic_write_text(target, json.dumps({**share, RUN_KEY: task_key}, indent=1), durable=True)


def _merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from task shares (and a results dict of further tasks): the per-task entries
    joined, the rest (lm-eval's run settings, which the key makes equal) from the last part."""
    merged = {k: v for k, v in parts[-1].items() if k not in PER_TASK_KEYS}
    for key in PER_TASK_KEYS:
        joined = {task: value for part in parts for task, value in (part.get(key) or {}).items()}
        if joined or key in parts[-1]:
            merged[key] = joined
    return merged


def _assembled_from_tasks(config: LMEvalConfig, model: str, key: dict[str, Any], cache_dir: str | Path,
                          requests: Path, manager: Any) -> dict[str, Any] | None:
    """``model``'s results for ``config.tasks`` (run key ``key``) from the task shares an earlier
    measurement of other task lists left in ``cache_dir``, lm-eval measuring only the tasks none holds;
    None when none is held (or the task index cannot tell which tasks the list runs), and the whole list
    is measured as it is."""
    tasks = planned_tasks(config)
    if not tasks:
        return None
    shares, missing = [], []
    for task in tasks:
        share = _saved_results(*_task_share(cache_dir, key, task))
        if share is None:
            missing.append(task)
        else:
            shares.append(share)
    if not shares:
        return None
    logger.info("lm-eval: %d of %d task(s) of %s found measured in the cache%s.", len(shares), len(tasks), model,
                f"; evaluating the other {len(missing)}" if missing else "")
    if missing:
        fresh = run_lm_eval(config.replace(tasks=missing), model, requests, manager)
        _keep_task_shares(fresh, cache_dir, key)
        shares.append(fresh)
    return _merged(shares)


def lm_eval_ground_truth(config: LMEvalConfig, out_dir: str | Path,
                         cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Evaluate base and edited with lm-eval and write ``ground_truth.csv``; returns the table. A
    model's evaluation is skipped when its results for the same ``run_key`` are in ``out_dir`` or in
    ``cache_dir`` (where they are kept too: see the module doc)."""
    config.check_ready()
    from mneme_plugin.activations.models import require_model

    for side, model in (("base", config.base), ("edited", config.edited)):  # both, before either is evaluated
        require_model(model, f"lm-eval {side}", config.model_args.get("revision"))
    out = start_measurement(out_dir, CONFIG_FILE, config)
    results: dict[str, dict[str, Any]] = {}
    manager = None
    for side, model in (("before", config.base), ("after", config.edited)):
        path, key = out / RESULTS_JSON[side], run_key(config, model)
        kept = cached_results_path(cache_dir, key) if cache_dir is not None else None
        data, in_cache, assembled = _saved_results(path, key), False, None
        if data is not None:
            logger.info("lm-eval: %s results found in %s; not re-run.", side, path)
        elif kept is not None and (data := _saved_results(kept, key)) is not None:
            logger.info("lm-eval: %s results of %s found in the cache %s; not re-run.", side, model, kept)
            atomic_write_text(path, json.dumps(data, indent=1), durable=True)
            in_cache = True
        else:
            manager = manager or task_manager(config)
            requests = out / CACHE_DIR / f"lm_eval_{side}_{json_digest(key)}"
            assembled = (_assembled_from_tasks(config, model, key, cache_dir, requests, manager)
                         if cache_dir is not None and key["model_files"] is not None else None)
            if assembled is not None:
                data = assembled
            else:
                logger.info("lm-eval: evaluating %s model %s on %d task(s).", side, model, len(config.tasks))
                data = run_lm_eval(config, model, requests, manager)
            if key["model_files"] is None:  # a hub model lm-eval has just downloaded: keyed by the commit it got
                key = run_key(config, model)
                kept = cached_results_path(cache_dir, key) if cache_dir is not None else None
            data[RUN_KEY] = key
            atomic_write_text(path, json.dumps(data, indent=1), durable=True)
        if cache_dir is not None and assembled is None and key["model_files"] is not None:
            _keep_task_shares(data, cache_dir, key)  # also of results an earlier version measured
        if kept is not None and not in_cache:
            atomic_write_text(kept, json.dumps(data, indent=1), durable=True)
        results[side] = data
    table = table_from_results(results["before"], results["after"], config.metric)
    save_scores(table, out / SCORES_CSV)
    return table


def lm_eval_table_from_files(before: str | Path, after: str | Path, out_dir: str | Path,
                             metric: str | dict[str, str] | None = None) -> pd.DataFrame:
    """``ground_truth.csv`` from lm-eval results JSON files produced elsewhere."""
    table = scores_from_lm_eval(before, after, metric)
    save_scores(table, Path(out_dir) / SCORES_CSV)
    return table
