"""The stages of ``mneme run``, in order. Each is a thin call of the stage's public function,
reading the earlier stages' outputs only through their loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mneme_plugin.errors import ConfigError
from mneme_plugin.interventions.step import EDITED_BY_RUN
from mneme_plugin.layout import RunLayout
from mneme_plugin.pipeline.config import RunConfig
from mneme_plugin.pipeline.stage import PipelineContext, Stage


def _intervention(ctx: PipelineContext) -> None:
    from mneme_plugin.interventions.step import run_intervention

    assert ctx.config.intervention is not None
    run_intervention(ctx.config.intervention, ctx.config.models.base, ctx.layout.edited_model, progress=ctx.progress)


def _ground_truth(ctx: PipelineContext) -> None:
    from mneme_plugin.groundtruth.sources import measure_tables

    measure_tables(ctx.config.ground_truth, ctx.config.model_spec("base"), ctx.config.model_spec("edited"),
                   ctx.layout.ground_truth, cache_dir=ctx.layout.cache("ground_truth"))


def _harvest(ctx: PipelineContext) -> None:
    from mneme_plugin.activations import harvest

    harvest(ctx.model("base"), ctx.model("edited"), ctx.corpus(), ctx.config.harvest, ctx.layout.activations,
            progress=ctx.progress)


def _stream(ctx: PipelineContext, batch_size: int, shuffle_buffer_rows: int) -> Any:
    """Paired activations harvested on the fly with the run's harvest section (no store); under
    torchrun (training), this rank's share of each global batch; rank 0's lone stages see one process."""
    from mneme_plugin.activations import harvest_stream
    from mneme_plugin.distributed import distributed_context

    return harvest_stream(ctx.model("base"), ctx.model("edited"), ctx.corpus(), ctx.config.harvest,
                          batch_size=batch_size, shuffle_buffer_rows=shuffle_buffer_rows,
                          seed=ctx.config.training.seed, dist=distributed_context(ctx.config.training.device))


def _train(ctx: PipelineContext) -> None:
    from mneme_plugin.crosscoder.training import train

    training = ctx.config.training
    data = (_stream(ctx, training.batch_size, training.shuffle_buffer_rows) if training.stream
            else ctx.layout.activations)
    train(data, ctx.layout.crosscoder_run, ctx.config.crosscoder, training, progress=ctx.progress)


def _attribute(ctx: PipelineContext) -> None:
    from mneme_plugin.attribution import attribute

    batch = ctx.config.attribution.batch_size
    # Streaming: every row once, in any order, through the smallest buffer the stream allows.
    data = _stream(ctx, batch, 2 * batch) if ctx.config.training.stream else ctx.layout.activations
    attribute(ctx.layout.crosscoder_run, data, ctx.config.attribution, ctx.layout.attribution, progress=ctx.progress)


# What the harvest reads of the models section: the models, not the edit's description (evaluate's naive baseline).
_MODELS = ("models.base", "models.edited")


def _train_sections(config: RunConfig) -> tuple[str, ...]:
    # Streaming, the harvest stage does not run: training reads what it would have read, and its batches
    # depend on the forward batch size (the shuffle buffer fills a forward batch at a time).
    return (*_MODELS, "corpus", "harvest", "harvest.batch_size", "crosscoder", "training") if config.training.stream \
        else ("crosscoder", "training")


def _train_sections_before(config: RunConfig) -> tuple[str, ...]:
    """``_train_sections`` as markers before version 3 read them."""
    return ("models", "corpus", "harvest", "crosscoder", "training") if config.training.stream \
        else ("crosscoder", "training")


def _attribute_sections(config: RunConfig) -> tuple[str, ...]:
    # Streaming, the batch size decides which rows are attributed: the stream drops its last partial batch
    # and its shuffle buffer is two batches.
    return ("attribution", "attribution.batch_size") if config.training.stream else ("attribution",)


def _collect(ctx: PipelineContext) -> None:
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interpret.contexts import collect

    # The contexts are read with the run's own harvest settings unless the collect section names others.
    config = ctx.config.collect
    if config.harvest is None:
        config = config.replace(harvest=ctx.config.harvest)
    collect(ctx.model("base"), ctx.model("edited"), ctx.layout.crosscoder_run, ctx.corpus(), config,
            ctx.layout.contexts, attribution=load_attribution(ctx.layout.attribution), progress=ctx.progress)


def _explain(ctx: PipelineContext) -> None:
    from mneme_plugin.interpret.explain import explain

    tokenizer = ctx.models["base"].tokenizer if "base" in ctx.models else None
    explain(ctx.layout.contexts, ctx.config.explain, ctx.layout.explanations, tokenizer=tokenizer,
            progress=ctx.progress, cache_dir=ctx.layout.cache("explain"))


def _map(ctx: PipelineContext) -> None:
    from mneme_plugin.interpret.mapping import map_descriptions

    map_descriptions(ctx.layout.explanations, ctx.config.map, ctx.layout.mapping, progress=ctx.progress,
                     cache_dir=ctx.layout.cache("map"))


def _taxonomy_digests(config: RunConfig) -> dict[str, str]:
    """The content of each taxonomy the map stage reads (a built-in edited, or a file changed, remaps)."""
    from mneme_plugin.interpret.taxonomy import load_taxonomy, taxonomy_digest

    out = {}
    for name in config.map.taxonomies:
        try:
            out[name] = taxonomy_digest(load_taxonomy(name))
        except ConfigError:
            out[name] = "unreadable"  # the stage itself reports it
    return out


def corpus_digest(config: RunConfig) -> str | None:
    """The content digest of a local corpus file (``files.content_digest``); None for hub datasets
    and for a file that is not there now, whose content cannot be checked."""
    from mneme_plugin.files import content_digest

    path = Path(config.corpus.source)
    return content_digest(path) if path.is_file() else None


def reads_corpus(stage: Stage, config: RunConfig) -> bool:
    return "corpus" in stage.sections_of(config)


def input_digests(stage: Stage, config: RunConfig, corpus: str | None) -> dict[str, str]:
    """Digests of the files outside the run directory that ``stage`` reads but its fingerprint only
    names, for its marker: ``corpus``, the local corpus file's content (``corpus``, the plan's
    ``corpus_digest``, read once for all stages); ``model:base`` / ``model:edited``, the models'
    weights (``model_digests``); and
    ``model:embedding``, the map stage's ``embedding_model`` folder (method embedding; metadata);
    ``data:SPEC``, the intervention's local training data (SFT data, RMU corpora: a file's content, a
    folder's metadata); ``file:PATH``, the ground-truth files' content (``files.content_digest``: CSV /
    lm-eval JSON files, a judge's questions), ``folder:PATH``, lm-eval's ``include_path`` task folders
    (metadata). A corpus, model folder, hub model's cached commit, data or ground-truth file or task
    folder changed in place then redoes the stage. Hub datasets have none,
    nor has the edited model the run's own intervention writes (a redone intervention redoes what
    follows it)."""
    from mneme_plugin.files import content_digest, stat_digest

    sections = stage.sections_of(config)
    out = {}
    if corpus is not None and reads_corpus(stage, config):
        out["corpus"] = corpus
    out.update(model_digests(stage, config))
    if "intervention" in sections and config.intervention is not None:
        from mneme_plugin.interventions.checkpoints import input_digests as data_digests

        for spec, digest in data_digests(config.intervention.resolved("").data_sources()).items():
            out[f"data:{spec}"] = digest
    if "map" in sections and config.map.method == "embedding" and config.map.embedding_model:
        # The local sentence-transformers folder (metadata, as for the models): one saved over in place remaps.
        digest = stat_digest(config.map.embedding_model)
        if digest is not None:
            out["model:embedding"] = digest
    if "ground_truth" in sections:
        for path in config.ground_truth.files():
            if Path(path).is_file():
                out[f"file:{path}"] = content_digest(path)
        for path in config.ground_truth.measurement_inputs():
            if Path(path).is_file():
                out[f"file:{path}"] = content_digest(path)
            elif Path(path).is_dir():  # lm-eval task folders: importing their code writes __pycache__
                out[f"folder:{path}"] = stat_digest(path, skip_dirs=("__pycache__",))
    return out


def model_digests(stage: Stage, config: RunConfig) -> dict[str, str]:
    """``model:base`` / ``model:edited``: the weights of the models ``stage`` reads
    (``activations.models.weights_digest``: a local folder's metadata, its gigabytes not read; a hub
    id's commit in the local hub cache). None is recorded for a hub id not downloaded yet: the stage
    that downloads it records its commit when it finishes (``pipeline.run``)."""
    from mneme_plugin.activations.models import weights_digest

    sections = stage.sections_of(config)
    out = {}
    for role in ("base", "edited"):
        spec = getattr(config.models, role)
        # An empty spec: the models are passed as objects (run_pipeline(models=...)), no folder to check.
        if not spec or not ("models" in sections or f"models.{role}" in sections) \
                or (role == "edited" and spec == EDITED_BY_RUN):
            continue
        digest = weights_digest(spec)
        if digest is not None:
            out[f"model:{role}"] = digest
    return out


def _control_digest(config: RunConfig) -> dict[str, str]:
    """The control run's attribution the predict stage reads (a redone control re-predicts)."""
    from mneme_plugin.attribution.table import TABLE_PARQUET
    from mneme_plugin.files import file_digest

    if config.predict.control_run is None:
        return {}
    table = RunLayout(Path(config.predict.control_run)).attribution / TABLE_PARQUET
    return {"control_attribution": file_digest(table) if table.is_file() else "missing"}


def _predicted_taxonomies(config: RunConfig) -> dict[str, Any]:
    """The taxonomies predict predicts for (and so its folders) when the ground-truth tables add some to the
    map section's first: only then, so fingerprints made before it counted them stay as they were."""
    taxonomies = config.taxonomies()
    return {} if taxonomies == config.map.taxonomies[:1] else {"taxonomies": taxonomies}


def _predict(ctx: PipelineContext) -> None:
    from mneme_plugin.sideeffects import predict_run

    taxonomies = ctx.config.taxonomies()
    if len(taxonomies) == 1:  # one taxonomy: prediction/ itself, as always
        predict_run(ctx.layout.root, ctx.config.predict, taxonomies[0])
        return
    for taxonomy in taxonomies:
        predict_run(ctx.layout.root, ctx.config.predict, taxonomy, out_dir=ctx.layout.prediction / taxonomy)


def _evaluate(ctx: PipelineContext) -> None:
    from mneme_plugin.sideeffects import evaluate_run, evaluate_tables

    if not ctx.config.ground_truth.tables:
        evaluate_run(ctx.layout.root, ctx.config.evaluate, ctx.config.ground_truth, ctx.config.map,
                     intervention=ctx.config.models.intervention)
        return
    # The metrics tables are the caller's to show (`mneme run` prints them once, at the end, also when
    # this stage was skipped; the demo prints its own).
    evaluate_tables(ctx.layout.root, ctx.config.evaluate, ctx.config.ground_truth, ctx.config.map,
                    ctx.config.taxonomies(), intervention=ctx.config.models.intervention)


def _report(ctx: PipelineContext) -> None:
    from mneme_plugin.report.build import build_report

    build_report(ctx.layout.root)


# With `training.stream` the harvest writes no store: training and attribution harvest on the fly.
# The intervention and the measured ground truth (optional sections) come first: edit, ground truth,
# MNEME, evaluation, report. Each stage's fingerprint chains to the ones it reads (`after`), so a
# changed ground truth does not redo the crosscoder and a changed crosscoder does not redo lm-eval.
STAGES: list[Stage] = [
    Stage("intervention", ("models.base", "intervention"), lambda l: l.edited_model, _intervention,
          present=lambda c: c.intervention is not None, after=(), off_reason="the config has no intervention section"),
    Stage("ground_truth", ("models.base", "models.edited", "ground_truth"), lambda l: l.ground_truth, _ground_truth,
          present=lambda c: c.ground_truth.measured or bool(c.ground_truth.tables), after=("intervention",),
          off_reason="the config's ground_truth section has no tables (ground_truth.tables)"),
    Stage("harvest", (*_MODELS, "corpus", "harvest"), lambda l: l.activations, _harvest,
          sections_before=("models", "corpus", "harvest"),
          enabled=lambda c: not c.training.stream, after=("intervention",), all_ranks=True,
          off_reason="training.stream is set: training and attribution harvest on the fly, into no store"),
    Stage("train", _train_sections, lambda l: l.crosscoder_run, _train, sections_before=_train_sections_before,
          after=("harvest", "intervention"), all_ranks=True),
    Stage("attribute", _attribute_sections, lambda l: l.attribution, _attribute, sections_before=("attribution",)),
    Stage("collect", ("collect", "harvest", "corpus"), lambda l: l.contexts, _collect),
    Stage("explain", ("explain",), lambda l: l.explanations, _explain),
    Stage("map", ("map",), lambda l: l.mapping, _map, inputs=_taxonomy_digests),
    Stage("predict", ("predict", "map"), lambda l: l.prediction, _predict, inputs=_control_digest,
          derived=_predicted_taxonomies),
    Stage("evaluate", ("evaluate", "ground_truth", "models"), lambda l: l.evaluation, _evaluate,
          enabled=lambda c: c.ground_truth.available, after=("predict", "ground_truth"),
          off_reason="the config has no ground truth to evaluate against (ground_truth: scores_csv, "
                     "lm_eval_before / lm_eval_after, or tables)"),
    Stage("report", (), lambda l: l.report, _report),
]


def config_problems(config: RunConfig, models: dict[str, Any] | None = None) -> list[str]:
    """What can be checked before the first stage runs, so a run does not fail hours in: the
    files the config names exist, lm-eval would take the task lists and the taxonomies load. (Types
    and values were checked when the config was read.) ``models``: model objects given instead of
    the config's names."""
    from mneme_plugin.activations.models import check_model_spec
    from mneme_plugin.interpret.taxonomy import load_taxonomy

    problems = []
    for which in ("base", "edited"):
        if (models is None or which not in models) and not (which == "edited" and config.intervention is not None):
            problems += check_model_spec(getattr(config.models, which), f"models.{which}")
    source = config.corpus.source
    if source.startswith("hf:") and config.harvest.max_tokens is None:
        problems.append(
            f"harvest.max_tokens is not set and corpus.source is a Hugging Face data set ({source}): the run would "
            "harvest all of it (into the activation store, or with training.stream in attribute), which for a "
            "pretraining corpus fills the disk or never ends; set harvest.max_tokens (at least training.steps x "
            "batch_size plus eval_rows; the paper's crosscoders read 50M-200M tokens).")
    if not source.startswith("hf:") and not Path(source).is_file():
        problems.append(f"corpus.source: {source} is neither an existing file nor hf:NAME[@CONFIG][:SPLIT].")
    elif not source.startswith("hf:"):
        from mneme_plugin.activations.corpus import local_corpus_problem

        problem = local_corpus_problem(source)
        if problem:
            problems.append(f"corpus.source: {problem}")
    problems += _stream_length_problems(config)
    problems += _ground_truth_problems(config)
    for path in config.ground_truth.files():
        if not Path(path).is_file():
            problems.append(f"ground_truth: {path} does not exist.")
    for name in config.map.taxonomies:
        try:
            load_taxonomy(name)
        except ConfigError as err:
            problems.append(f"map.taxonomies: {err}")
    if config.map.method == "embedding" and config.map.embedding_model:
        from mneme_plugin.interpret.config import embedding_model_problem

        problem = embedding_model_problem(config.map.embedding_model)
        if problem:
            problems.append(f"map.embedding_model: {problem}")
    return problems


def client_problems(config: RunConfig, stage_names: set[str] | list[str]) -> list[str]:
    """The LLM clients that the stages ``stage_names`` (those a run will run) call at a hosted (https)
    endpoint whose ``env:NAME`` API key is not set (``interpret.clients.missing_key_problem``): refused before
    the first stage, not after the intervention and the base model's answers. Stages that will not run (done,
    or outside ``--only``) need no key; neither do answers already in the LLM caches, but the caches cannot
    tell beforehand whether every call is in them."""
    names, problems = set(stage_names), []
    if "ground_truth" in names:
        for name, table in config.ground_truth.tables.items():
            if table.judge is not None:
                problems += table.judge.key_problems(f"ground_truth.tables.{name}.judge")
    if "explain" in names and config.explain.calls_llm:
        problems.append(config.explain.client.key_problem("explain.client"))
    if "map" in names and config.map.calls_llm:
        problems.append(config.map.client.key_problem("map.client"))
    return [p for p in problems if p]


def _stream_length_problems(config: RunConfig) -> list[str]:
    """A streamed training longer than one pass over the harvest's tokens (``stream_length_problem``)."""
    from mneme_plugin.activations.stream import stream_length_problem

    training = config.training
    problem = training.stream and stream_length_problem(config.harvest.token_budget, training.steps,
                                                        training.batch_size)
    return [problem] if problem else []


def missing_inputs(config: RunConfig) -> list[str]:
    """Local data files the intervention and the measured ground truth read that do not exist (yet):
    a run refuses to start; a dry run lists them as data to fetch (the recipes' READMEs say how)."""
    wanted: list[tuple[str, str]] = []
    if config.intervention is not None:
        settings = config.intervention.resolved("")
        for key in ("data", "forget_corpora", "retain_corpora"):
            value = getattr(settings, key, None)
            for spec in ([value] if isinstance(value, str) else value or []):
                wanted.append((f"intervention.settings.{key}", spec))
    for name, table in config.ground_truth.tables.items():
        if table.judge is not None:
            wanted.append((f"ground_truth.tables.{name}.judge.questions", table.judge.questions))
        if table.lm_eval is not None:
            wanted += [(f"ground_truth.tables.{name}.lm_eval.include_path", p) for p in table.lm_eval.include_path]
    return [f"{key}: {spec} does not exist." for key, spec in wanted
            if spec and not spec.startswith("hf:") and not Path(spec).exists()]


def hub_model_problems(config: RunConfig, models: dict[str, Any] | None = None) -> list[str]:
    """The run's hub models (those not given as objects in ``models``, nor written by the intervention, nor
    refused already by ``check_model_spec``) that can be neither found in the local hub cache nor downloaded
    (``hub_model_problem``: one request to the hub, none with HF_HUB_OFFLINE set)."""
    from mneme_plugin.activations.models import check_model_spec, hub_model_problem

    problems = []
    for which in ("base", "edited"):
        spec = getattr(config.models, which)
        if (not spec or (models is not None and which in models) or (which == "edited" and config.intervention is not None)
                or check_model_spec(spec, f"models.{which}")):
            continue
        problem = hub_model_problem(spec)
        if problem:
            problems.append(f"models.{which}: {problem}")
    return problems


def validate_for_run(config: RunConfig, stages: list[Stage], models: dict[str, Any] | None = None) -> None:
    """Refuse to start a run whose config has problems (``config_problems``), or whose hub models can be
    neither found in the local hub cache nor downloaded (``hub_model_problem``: one request to the hub,
    so not in a dry run, which checks offline)."""
    problems = config_problems(config, models) + missing_inputs(config) + hub_model_problems(config, models)
    if problems:
        raise ConfigError("The run config has problems; nothing was run:\n  " + "\n  ".join(problems)
                          + f"\n{relative_paths_note()}")


def _ground_truth_problems(config: RunConfig) -> list[str]:
    """Task lists lm-eval would refuse only once a model is loaded, after the intervention
    (``groundtruth.harness.task_problems``: its task index, offline, seconds the first time), and
    tables' ``categories`` that fit neither the tasks lm-eval will run nor their taxonomy
    (``sources.categories_problems``)."""
    from mneme_plugin.groundtruth.harness import task_problems
    from mneme_plugin.groundtruth.sources import categories_problems

    problems = []
    for name, table in config.ground_truth.tables.items():
        if table.lm_eval is None or not all(Path(p).is_dir() for p in table.lm_eval.include_path):
            continue  # a missing include_path is missing_inputs' to name
        try:
            problems += [f"ground_truth.tables.{name}.lm_eval: {p}" for p in task_problems(table.lm_eval)]
        except ImportError:  # lm-eval not installed: the stage says how to install it
            break
    return problems + categories_problems(config.ground_truth, config.map.taxonomies[0])


def relative_paths_note() -> str:
    """Where a config's relative paths point: the current directory, not the config file's folder (a
    recipe's smoke.yaml run from elsewhere than where its make_smoke.py wrote the data)."""
    return f"Relative paths in the config are read from the current directory, {Path.cwd()}."
