"""``mneme``: the command line, a thin click layer over the Python API.

Each stage has a subcommand. Options given on the command line override the matching keys of
the stage's YAML config (``--config``), whose keys are the fields of the stage's dataclass.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

# Only light modules at import time (no torch): `mneme --help` must answer at once. The choices of
# the options come from these registries.
from mneme_plugin.activations.config import MODEL_DTYPES, STORAGE_DTYPES
from mneme_plugin.config import read_yaml_mapping
from mneme_plugin.crosscoder.losses import RECONSTRUCTION_LOSSES
from mneme_plugin.crosscoder.salience import SALIENCE_MODES
from mneme_plugin.commands.common import clear_errors, run_recorded
from mneme_plugin.errors import ConfigError
from mneme_plugin.interpret.config import CLIENTS, EXPLAINERS, LABELERS, MAP_CLIENTS, MAPPERS, SCORERS
from mneme_plugin.layout import CACHE_DIR, CACHE_STAGES, RunLayout
from mneme_plugin.organism.catalog import BEHAVIOUR_INTERVENTIONS, INTERVENTIONS, KNOWLEDGE_INTERVENTIONS
from mneme_plugin.sideeffects.config import REMEDIATION_TARGETS, RULE_SUMMARIES, RULES, SIDES
from mneme_plugin.sideeffects.metrics import UNDEFINED

if TYPE_CHECKING:
    from mneme_plugin.pipeline.config import RunConfig


def _setup_logging(verbose: bool) -> None:
    import os

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mneme_plugin")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    if rank != "0":  # under torchrun the ranks would repeat rank 0's lines: rank 0 speaks for the job
        # (a rank's own error still reaches its stderr; with -v every rank logs, its lines marked)
        if verbose:
            handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        else:
            handler.setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too


def _read_yaml(path: str | None) -> dict[str, Any]:
    return {} if path is None else read_yaml_mapping(path)


def _sections(data: dict[str, Any], allowed: tuple[str, ...], path: str | None) -> dict[str, dict[str, Any]]:
    """The config file's sections this command reads, each a mapping (an empty one when absent)."""
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ConfigError(f"Unknown section(s) {unknown} in {path}; this command reads {list(allowed)}.")
    out = {}
    for name in allowed:
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of keys to values, got {type(value).__name__} {value!r} "
                              f"(in {path}).")
        out[name] = dict(value or {})
    return out


def _run_config(run_dir: str) -> RunConfig | None:
    """The run directory's own config (a pooled folder's: its first run's; ``sideeffects.steps.settings_run``)."""
    from mneme_plugin.sideeffects.steps import settings_run

    source = settings_run(run_dir)
    if source is None:
        return None
    from mneme_plugin.pipeline.config import load_run_config

    return load_run_config(source)


def _run_sections(run_config: RunConfig | None, config: str | None, allowed: tuple[str, ...],
                  from_run: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``_sections`` of ``--config`` over the ``from_run`` sections of the run's own config
    (``_run_config``), so a run predicts over its own taxonomies: a key of ``--config`` replaces the
    run's, the others stay."""
    sections = _sections(_read_yaml(config), allowed, config)
    if run_config is not None:
        own = run_config.to_dict()
        sections.update({name: {**dict(own.get(name) or {}), **sections.get(name, {})} for name in from_run})
    return sections


def _override(section: dict[str, Any], **values: Any) -> dict[str, Any]:
    """Command-line values (not None) override the YAML's."""
    return {**section, **{k: v for k, v in values.items() if v is not None}}


def _unmark_run_stages(folder: str | Path, stage: str) -> None:
    """A stage command writing ``stage``'s outputs into a `mneme run` directory: the markers of that stage and the
    later ones go (``pipeline.run.unmark_written_stage``), and the user is told what `mneme run` will redo."""
    from mneme_plugin.pipeline.run import unmark_written_stage

    removed = unmark_written_stage(folder, stage)
    if removed:
        click.echo(f"{Path(folder)} is in a `mneme run` directory: its stage(s) {', '.join(removed)} are no longer "
                   "marked done (what this command writes is not what the run's config.yaml made); `mneme run` "
                   "redoes them from config.yaml.", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mneme-plugin")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """MNEME: find what else changed when a model was fine-tuned or unlearned.

    `mneme run CONFIG` runs the whole pipeline (harvest, train, attribute, collect, explain, map, predict,
    evaluate, report); each stage is also a command. `mneme demo` runs it on the CPU model organism.
    """
    _setup_logging(verbose)


# --------------------------------------------------------------------------------- harvest

_harvest_options = [
    click.option("--base", help="Base model: HF name or local folder."),
    click.option("--edited", help="Edited (fine-tuned / unlearned) model: HF name or local folder."),
    click.option("--corpus", help="Local .txt/.jsonl/.parquet file, or hf:NAME[@CONFIG][:SPLIT]."),
    click.option("--layer", type=int, help="Block index to read (blocks.{L}.hook_resid_post by default)."),
    click.option("--hook", "hook_name", help="Hook point name, e.g. blocks.{layer}.hook_resid_pre."),
    click.option("--max-tokens", type=int, help="Stop after this many corpus tokens."),
    click.option("--context-length", type=int, help="Tokens per window."),
    click.option("--batch-size", "harvest_batch_size", type=int, help="Windows per forward pass."),
    click.option("--dtype", type=click.Choice(STORAGE_DTYPES), help="Storage dtype."),
    click.option("--model-dtype", type=click.Choice(MODEL_DTYPES), help="Dtype the models are loaded in (default float32)."),
    click.option("--device", help="Device for the models (cpu, cuda, cuda:1...)."),
]


def _add_options(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorator


def _models_and_corpus(sections: dict[str, dict[str, Any]], base, edited, corpus) -> tuple[str, str, Any]:
    """(base, edited, corpus source) from the YAML sections models / corpus, overridden by options."""
    from mneme_plugin.activations.corpus import corpus_from_spec

    models = _override(sections["models"], base=base, edited=edited)
    for key in ("base", "edited"):
        if not models.get(key):
            raise ConfigError(f"No {key} model: pass --{key} or set models.{key} in the config.")
    from mneme_plugin.activations.models import check_model_spec

    for key in ("base", "edited"):  # both, before either loads (a model may take minutes)
        problems = check_model_spec(str(models[key]), key)
        if problems:
            raise ConfigError(problems[0])
    corpus_spec = corpus or sections["corpus"].get("source")
    if not corpus_spec:
        raise ConfigError("No corpus: pass --corpus or set corpus.source in the config.")
    source = corpus_from_spec(str(corpus_spec))
    if isinstance(source, Path) and not source.exists():  # before loading any model (a hub model may take minutes)
        raise ConfigError(f"Corpus {source} does not exist: give a .txt / .jsonl / .parquet file or "
                          "hf:NAME[@CONFIG][:SPLIT].")
    if isinstance(source, Path):
        from mneme_plugin.activations.corpus import local_corpus_problem

        problem = local_corpus_problem(source)
        if problem:
            raise ConfigError(f"Corpus {problem}")
    return models["base"], models["edited"], source


def _complete_store(folder: str | Path) -> bool:
    """Whether ``folder`` holds an activation store whose harvest finished."""
    from mneme_plugin.activations.manifest import read_manifest
    from mneme_plugin.errors import MnemeError

    try:
        return bool(read_manifest(folder).get("complete"))
    except (MnemeError, OSError):
        return False


def _harvest_inputs(sections: dict[str, dict[str, Any]], base, edited, corpus, layer, hook_name, max_tokens,
                    context_length, harvest_batch_size, dtype, model_dtype, device):
    """(base, edited, corpus, HarvestConfig) from the YAML sections models / corpus / harvest and options."""
    from mneme_plugin.activations import HarvestConfig

    base, edited, source = _models_and_corpus(sections, base, edited, corpus)
    values = _override(sections["harvest"], layer=layer, hook_name=hook_name, max_tokens=max_tokens,
                       context_length=context_length, batch_size=harvest_batch_size, dtype=dtype,
                       model_dtype=model_dtype, device=device)
    if "layer" not in values:
        raise ConfigError("No layer to read: pass --layer (or set harvest.layer in the config).")
    return base, edited, source, HarvestConfig.from_dict(values, section="harvest")


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with sections models, corpus, harvest.")
@_add_options(_harvest_options)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Activation store directory.")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out first.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Ranks on this node, each harvesting a share: relaunches this command under torchrun.")
@clear_errors
def harvest(config, out, overwrite, nproc, **options) -> None:
    """Harvest paired (base, edited) activations into an on-disk store.

    An interrupted harvest resumes when run again with the same options.
    """
    _relaunch_if_asked(nproc)
    from mneme_plugin.activations import harvest as run_harvest
    from mneme_plugin.distributed import distributed_context

    sections = _sections(_read_yaml(config), ("models", "corpus", "harvest"), config)
    base, edited, corpus, harvest_cfg = _harvest_inputs(sections, **options)
    # A new or replaced store in a run directory: what its stages made from the old one is no longer done.
    # (A complete store at --out without --overwrite is kept, or refused: nothing is written.)
    if (overwrite or not _complete_store(out)) and distributed_context(harvest_cfg.device).is_main:
        _unmark_run_stages(out, "harvest")
    store = run_harvest(base, edited, corpus, harvest_cfg, out, overwrite=overwrite)
    if distributed_context().is_main:  # under torchrun rank 0 reports
        click.echo(f"{store.num_rows} paired rows of width {store.d_model} in {store.path}")


# --------------------------------------------------------------------------------- train

@main.command()
@click.option("--store", type=click.Path(exists=True, file_okay=False), help="Activation store to train on.")
@click.option("--stream", is_flag=True, help="Harvest on the fly into a shuffle buffer instead of a store.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML with sections crosscoder, training (and models, corpus, harvest for --stream).")
@_add_options(_harvest_options)
@click.option("--shuffle-buffer", type=int,
              help="Rows in the stream's shuffle buffer (default: training.shuffle_buffer_rows, 262,144).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--dict-size", type=int, help="Number of latents (default expansion_factor * d_model).")
@click.option("--expansion-factor", type=int, help="Latents per model dimension (used when --dict-size is not given).")
@click.option("-k", "--k", type=int, help="Average active latents per token (BatchTopK).")
@click.option("--salience", type=click.Choice(sorted(SALIENCE_MODES)),
              help="Decoder-norm weight of the BatchTopK selection (crosscoder: the published trainer's, the default; "
                   "paper: the MNEME paper's squared norms).")
@click.option("--loss", type=click.Choice(sorted(RECONSTRUCTION_LOSSES)),
              help="Reconstruction loss (default: TrainingConfig.loss, norm_1.25): norm is the published "
                   "trainer's, squared the paper's Eq. 1.")
@click.option("--steps", type=int, help="Optimisation steps.")
@click.option("--train-batch-size", type=int, help="Tokens per optimisation step.")
@click.option("--lr", type=float, help="Learning rate (default: scaled with the dictionary size and run length).")
@click.option("--seed", type=int, help="Training seed (initialisation and batch order).")
@click.option("--train-device", help="Device for training (auto, cpu, cuda).")
@click.option("--eval-rows", type=click.IntRange(min=0),
              help="Rows held out of training to measure the crosscoder on (metrics.json; default "
                   "training.eval_rows, 8192; at most half the store).")
@click.option("--no-resume", is_flag=True, help="Start over even if the run directory has checkpoints.")
@click.option("--allow-partial", is_flag=True, help="Train on a store whose harvest did not finish.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel ranks on this node: relaunches this command under torchrun.")
@clear_errors
def train(store, stream, config, shuffle_buffer, out, dict_size, expansion_factor, k, salience, loss, steps,
          train_batch_size, lr, seed, train_device, eval_rows, no_resume, allow_partial, nproc,
          **harvest_options) -> None:
    """Train a BatchTopK crosscoder, from a store or streaming; resumes from the newest checkpoint."""
    from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
    from mneme_plugin.crosscoder.training import train as run_train

    sections = _sections(_read_yaml(config), ("crosscoder", "training", "models", "corpus", "harvest"), config)
    cc_cfg = CrossCoderConfig.from_dict(
        _override(sections["crosscoder"], dict_size=dict_size, expansion_factor=expansion_factor, k=k, salience=salience),
        section="crosscoder",
    )
    tr_cfg = TrainingConfig.from_dict(
        _override(sections["training"], steps=steps, batch_size=train_batch_size, lr=lr, loss=loss, seed=seed,
                  device=train_device, shuffle_buffer_rows=shuffle_buffer, eval_rows=eval_rows),
        section="training",
    )
    if nproc != 1:  # after the configs: a batch the ranks cannot split is refused before they start
        from mneme_plugin.crosscoder.distributed import check_divisible

        if nproc > 1:
            check_divisible(tr_cfg.batch_size, nproc)
        _relaunch_if_asked(nproc)
    if store and stream:
        raise ConfigError("Pass either --store or --stream, not both.")
    if stream:
        from mneme_plugin.activations import harvest_stream
        from mneme_plugin.distributed import distributed_context

        base, edited, corpus, harvest_cfg = _harvest_inputs(sections, **harvest_options)
        from mneme_plugin.activations.stream import stream_length_problem

        problem = stream_length_problem(harvest_cfg.token_budget, tr_cfg.steps, tr_cfg.batch_size)
        if problem:  # before the models load and the process group starts, not hours into the training
            raise ConfigError(problem)
        # Under torchrun each rank harvests a share of the stream and trains on its slice of each global batch.
        data: Any = harvest_stream(base, edited, corpus, harvest_cfg, batch_size=tr_cfg.batch_size,
                                   shuffle_buffer_rows=tr_cfg.shuffle_buffer_rows, seed=tr_cfg.seed,
                                   dist=distributed_context(tr_cfg.device))
    elif store:
        data = store
    else:
        raise ConfigError("Nothing to train on: pass --store DIR, or --stream with --base/--edited/--corpus/--layer.")
    from mneme_plugin.crosscoder.files import training_finished
    from mneme_plugin.distributed import distributed_context

    # A new crosscoder in a run directory: what its stages made from the old one is no longer done. (A
    # finished training resumed is loaded, or refused for another config: nothing is written.)
    if (no_resume or not training_finished(out)) and distributed_context(tr_cfg.device).is_main:
        _unmark_run_stages(out, "train")
    result = run_train(data, out, cc_cfg, tr_cfg, resume=not no_resume, allow_partial=allow_partial)
    if not distributed_context().is_main:  # under torchrun rank 0 reports
        return
    click.echo(f"Crosscoder: {result.crosscoder_dir}")
    click.echo(json.dumps(result.metrics.to_dict(), indent=2))


# --------------------------------------------------------------------------------- demo

@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--target", "target_domain", default="law", show_default=True,
              help="Domain unlearned (RMU) or fine-tuned on (narrow).")
@click.option("--intervention", "interventions", multiple=True, type=click.Choice(INTERVENTIONS),
              help="Run only these interventions (default: the three knowledge edits, plus the behaviour "
                   "edits with --behaviours).")
@click.option("--behaviours", is_flag=True,
              help="Also run the behaviour cases (identity-shift and narrow 'insecure' fine-tuning of the "
                   "behaviour organism; about 8 more minutes on 2 CPU cores).")
@clear_errors
def demo(out: str, seed: int, target_domain: str, interventions: tuple[str, ...], behaviours: bool) -> None:
    """The whole MNEME method on the CPU model organism, with known ground truth.

    Trains a tiny LM on a generated 8-domain corpus, applies RMU unlearning, narrow fine-tuning and
    benign fine-tuning, and runs every stage of `mneme run` on a task-agnostic slice of the corpus:
    harvest, train, attribute, collect, explain, map, predict, evaluate (against the measured
    per-domain accuracy drops, with random, naive and oracle baselines) and report. With --behaviours
    it also trains the behaviour organism (requests it answers or refuses, persona questions) and
    scores identity-shift and narrow "insecure" fine-tuning on the behaviour categories.
    """
    from mneme_plugin.organism import run_demo

    chosen = interventions or (KNOWLEDGE_INTERVENTIONS + (BEHAVIOUR_INTERVENTIONS if behaviours else ()))
    result = run_demo(out, seed=seed, interventions=chosen, target_domain=target_domain)
    for case in result.cases:
        drops = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(case.drop.items(), key=lambda kv: -kv[1]))
        click.echo(f"\n== {case.intervention}" + (f" ({case.target_domain})" if case.target_domain else ""))
        if case.knowledge is not None:
            click.echo(f"safe-answer drop per behaviour category (refusals; aligned answers): {drops}")
        else:
            click.echo(f"accuracy drop per domain: {drops}")
        click.echo(f"degraded (drop > {case.drop_threshold:g}): {', '.join(case.degraded) or '(none)'}; "
                   f"MNEME predicted: {', '.join(case.predicted) or '(none)'}"
                   + (f" (change: {case.change})" if case.change else ""))
        click.echo(case.metrics[["method", "accuracy", "precision", "recall", "f1"]].to_string(
            index=False, float_format=lambda v: f"{v:.3f}", na_rep=UNDEFINED))
        if case.remediation is not None:
            _echo_remediation(case.remediation)
        elif case.degraded and case.knowledge is None:  # a knowledge case (behaviour cases have no remediation step)
            click.echo("remediation: not run (" + ("MNEME predicted no affected category, so nothing to retrain on"
                                                   if not case.predicted else "no collected latent to retrain on") + ")")
        if case.knowledge is not None:
            knowledge_drops = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(case.knowledge_drop.items(),
                                                                          key=lambda kv: -kv[1]))
            click.echo(f"knowledge: accuracy drop per domain: {knowledge_drops}")
            click.echo(case.knowledge[["method", "accuracy", "precision", "recall", "f1"]].to_string(
                index=False, float_format=lambda v: f"{v:.3f}", na_rep=UNDEFINED))
        if case.intersection is not None:
            click.echo(f"intersection: {case.intersection.summary()}")
        click.echo(f"report: {RunLayout(case.run_dir).report}")


def _echo_remediation(result) -> None:
    """The demo's remediation section: recovered share of the lost accuracy, remediation vs control."""
    cfg = result.config
    click.echo(f"remediation ({result.steps} steps, lr {cfg.get('lr'):g}, batch {cfg.get('batch_size')}, "
               f"{result.n_samples} samples per arm): share of the lost accuracy recovered")
    table = result.table()
    table = table[table["degraded"]][["category", "base", "edited", "remediated", "control",
                                      "recovered_remediated", "recovered_control"]]
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep=UNDEFINED))
    click.echo(f"mean recovered: remediation {result.mean_recovered('remediated'):.3f}, "
               f"control {result.mean_recovered('control'):.3f}")


# --------------------------------------------------------------------------------- info

@main.command()
@click.argument("path", type=click.Path(exists=True))
@clear_errors
def info(path: str) -> None:
    """Describe what PATH holds: an activation store, a crosscoder, a training run, a model folder, a run
    directory (where an interrupted one stopped) or a stage's output (attribution .. evaluation)."""
    from mneme_plugin.describe import describe_path

    click.echo(describe_path(path))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--cache", is_flag=True, help="Delete what the stages keep by content in RUN_DIR/cache/ (LLM answers, "
              "lm-eval results, judge answers). Their outputs stay; a stage redone later computes them again.")
@click.option("--stage", "stages", multiple=True, type=click.Choice(CACHE_STAGES),
              help="Only this stage's cache (repeatable; default: every stage's).")
@click.option("--checkpoints", is_flag=True, help="Delete a finished training's checkpoints (RUN_DIR/crosscoder_run/"
              "checkpoints/: only for resuming; runs of earlier versions, or with training.keep_finished_checkpoints, "
              "keep them). Refused while the training has not finished.")
@click.option("--dry-run", is_flag=True, help="List what would be deleted, with sizes; delete nothing.")
@clear_errors
def clean(run_dir: str, cache: bool, stages: tuple[str, ...], checkpoints: bool, dry_run: bool) -> None:
    """Free disk space in a run directory (`mneme run`'s): --cache deletes its cache, --checkpoints a finished
    training's checkpoints; never a stage's output."""
    if stages and not cache:
        raise click.UsageError("--stage chooses whose cache --cache deletes: add --cache (mneme clean RUN_DIR --cache "
                               f"--stage {stages[0]}).")
    if not cache and not checkpoints:
        raise click.UsageError("Say what to clean: --cache (what the stages keep in RUN_DIR/cache/) and / or "
                               "--checkpoints (a finished training's checkpoints).")
    if checkpoints:
        _clean_checkpoints(Path(run_dir), dry_run)
    if cache:
        _clean_cache(Path(run_dir), stages, dry_run)


def _clean_checkpoints(root: Path, dry_run: bool) -> None:
    from mneme_plugin.checkpoints import CHECKPOINT_DIR
    from mneme_plugin.crosscoder.files import remove_finished_checkpoints
    from mneme_plugin.files import output_lock, size_text
    from mneme_plugin.layout import RunLayout

    layout = RunLayout(root)
    layout.check_is_run()
    folder = layout.crosscoder_run / CHECKPOINT_DIR
    if not folder.is_dir():
        click.echo(f"No training checkpoints in {layout.crosscoder_run}.")
        return
    if dry_run:
        size = remove_finished_checkpoints(layout.crosscoder_run, dry_run=True)
        click.echo(f"Would delete (dry run): {folder.relative_to(root)}  {size_text(size)}")
        return
    with output_lock(root, "run directory"):  # not while a `mneme run` reads or writes it
        freed = remove_finished_checkpoints(layout.crosscoder_run)
    click.echo(f"Deleted {folder.relative_to(root)}: freed {size_text(freed)}; the crosscoder is untouched.")


def _clean_cache(root: Path, stages: tuple[str, ...], dry_run: bool) -> None:
    from mneme_plugin.files import size_text
    from mneme_plugin.layout import prune_cache

    entries = prune_cache(root, stages or None, dry_run=dry_run)
    if not entries:
        click.echo(f"Nothing cached in {root / CACHE_DIR}" + (f" for {', '.join(stages)}." if stages else "."))
        return
    click.echo(("Would delete (dry run):" if dry_run else "Deleted:"))
    for entry in entries:
        click.echo(f"  {entry.path.relative_to(root)}  {_files(entry.files)}, {size_text(entry.size)}")
    click.echo(f"{'Would free' if dry_run else 'Freed'} {size_text(sum(e.size for e in entries))} in "
               f"{_files(sum(e.files for e in entries))}; the stages' outputs are untouched.")


def _files(n: int) -> str:
    return f"{n} file" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------------- attribute

@main.command()
@click.option("--crosscoder", "crosscoder_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Crosscoder directory (or a training run directory holding crosscoder/, or a run directory).")
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False),
              help="Activation store to stream over (every row once).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the attribution table.")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with section attribution.")
@click.option("--batch-size", type=int, help="Rows encoded at a time.")
@click.option("--device", help="Device (auto, cpu, cuda).")
@click.option("--allow-store-mismatch", is_flag=True,
              help="Attribute over a store of another layer, hook or model pair than the crosscoder records.")
@click.option("--allow-partial", is_flag=True, help="Attribute over a store whose harvest did not finish.")
@clear_errors
def attribute(crosscoder_dir, store, out, config, batch_size, device, allow_store_mismatch, allow_partial) -> None:
    """Decoder norms, latent scaling and a class (suppressed .. amplified) for every latent."""
    from mneme_plugin.attribution import AttributionConfig, format_counts, format_delta_histogram
    from mneme_plugin.attribution import attribute as run_attribute

    from mneme_plugin.attribution.table import SUMMARY_FILE, TABLE_PARQUET

    sections = _sections(_read_yaml(config), ("attribution",), config)
    attr_cfg = AttributionConfig.from_dict(_override(sections["attribution"], batch_size=batch_size, device=device,
                                                     allow_store_mismatch=allow_store_mismatch or None),
                                           section="attribution")
    _unmark_run_stages(out, "attribute")
    result = run_attribute(crosscoder_dir, store, attr_cfg, out_dir=out, allow_partial=allow_partial)
    click.echo(format_counts(result.summary))
    click.echo(format_delta_histogram(result.summary))
    click.echo(f"Table: {Path(out) / TABLE_PARQUET} (+ .csv), summary: {Path(out) / SUMMARY_FILE}")


# --------------------------------------------------------------------------------- formats

_source_options = [
    click.option("--subfolder", help="Folder inside SOURCE (or the hub repo) holding the crosscoder."),
    click.option("--revision", help="Hub revision (branch, tag or commit) for hub ids."),
    click.option("--scale-factors", help="Kissane crosscoders only: per-model input scale factors 'BASE,EDITED'."),
]


def _parse_scale_factors(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as err:
        raise ConfigError(f"--scale-factors must be two numbers 'BASE,EDITED', got {text!r}.") from err
    if len(values) != 2:
        raise ConfigError(f"--scale-factors must be two numbers 'BASE,EDITED', got {text!r}.")
    return values


@main.command("import")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the crosscoder (own format).")
@_add_options(_source_options)
@click.option("--force", is_flag=True, help="Overwrite a crosscoder already in --out.")
@clear_errors
def import_(source, out, subfolder, revision, scale_factors, force) -> None:
    """Import a crosscoder (science-of-finetuning, Kissane, a mneme SAE-Lens export, trainSAE output of our trainer;
    folder or hub id)."""
    from mneme_plugin.formats import import_crosscoder, load_crosscoder

    path = import_crosscoder(source, out, force=force, subfolder=subfolder, revision=revision,
                             scale_factors=_parse_scale_factors(scale_factors))
    cfg = load_crosscoder(path).cfg
    click.echo(
        f"Imported {cfg.metadata.get('source_format', 'mneme')} crosscoder: d={cfg.activation_dim}, "
        f"latents={cfg.dict_size}, sparsity={cfg.sparsity}, salience={cfg.salience}, "
        f"normalization={cfg.normalization} -> {path}"
    )


@main.group()
def export() -> None:
    """Export a crosscoder to other tools' formats."""


@export.command("saelens")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory (one folder per hook inside).")
@click.option("--folder", help="Folder name inside --out (default: the hook name).")
@click.option("--hook", "hook_name", help="Hook name written to the metadata (default: the crosscoder's).")
@click.option("--base", "base_model", help="Base model name for the metadata (default: the crosscoder's).")
@click.option("--edited", "edited_model", help="Edited model name for the metadata (default: the crosscoder's).")
@click.option("--views", is_flag=True, help="Also write per-model views (d_in = d; partial: one model's input only).")
@_add_options(_source_options)
@click.option("--force", is_flag=True, help="Overwrite an existing export in --out.")
@clear_errors
def export_saelens_command(source, out, folder, hook_name, base_model, edited_model, views, subfolder, revision,
                           scale_factors, force) -> None:
    """Write SOURCE (any crosscoder mneme reads) as SAE-Lens jumprelu SAEs over concat(base, edited)."""
    from mneme_plugin.formats import export_saelens, load_crosscoder

    cc = load_crosscoder(source, subfolder=subfolder, revision=revision,
                         scale_factors=_parse_scale_factors(scale_factors))
    written = export_saelens(cc, out, folder=folder, hook_name=hook_name, base_model=base_model,
                             edited_model=edited_model, views=views, force=force)
    for view, path in written.items():
        click.echo(f"{view}: {path}")


# --------------------------------------------------------------------------------- collect / explain / map

@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with sections models, corpus, collect.")
@click.option("--crosscoder", "crosscoder_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Crosscoder directory (or a training run directory holding crosscoder/, or a run directory).")
@click.option("--attribution", type=click.Path(exists=True, file_okay=False),
              help="Attribution directory: choose latents by --classes and rank.")
@click.option("--base", help="Base model: HF name or local folder.")
@click.option("--edited", help="Edited model: HF name or local folder.")
@click.option("--corpus", help="Local .txt/.jsonl/.parquet file, or hf:NAME[@CONFIG][:SPLIT].")
@click.option("--layer", type=int, help="Block index (default: the layer the crosscoder records).")
@click.option("--hook", "hook_name", help="Hook point name (default: the hook the crosscoder records).")
@click.option("--allow-hook-mismatch", is_flag=True, help="Read at another layer / hook than the crosscoder records.")
@click.option("--latents", help="Comma-separated latent ids (instead of --attribution).")
@click.option("--classes", help="Comma-separated attribution classes, e.g. base_only,suppressed.")
@click.option("--per-class", type=int, help="Latents per class, most specific first.")
@click.option("--reference-latents", type=int,
              help="Also collect a uniform sample of this many live latents (the enrichment rule's reference).")
@click.option("--n-top", type=int, help="Top contexts kept per latent.")
@click.option("--context-length", type=int, help="Tokens per forward window.")
@click.option("--batch-size", "harvest_batch_size", type=int, help="Windows per forward pass.")
@click.option("--max-tokens", type=int, help="Stop after this many corpus tokens.")
@click.option("--device", help="Device for the models.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the contexts (Delphi cache).")
@clear_errors
def collect(config, crosscoder_dir, attribution, base, edited, corpus, layer, hook_name, allow_hook_mismatch, latents,
            classes, per_class, reference_latents, n_top, context_length, harvest_batch_size, max_tokens, device,
            out) -> None:
    """Top-activating contexts per latent, written in Delphi's cache layout.

    The corpus is read at the layer and hook the crosscoder records unless --layer / --hook (or
    collect.harvest in the config) say otherwise."""
    from mneme_plugin.interpret import CollectConfig
    from mneme_plugin.interpret import collect as run_collect

    sections = _sections(_read_yaml(config), ("models", "corpus", "collect"), config)
    base, edited, source = _models_and_corpus(sections, base, edited, corpus)

    def ids(text: str | None) -> list[int] | None:
        if text is None:
            return None
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise ConfigError(f"--latents must be comma-separated integers, got {text!r}.") from err

    section = dict(sections["collect"])
    reading = _override(dict(section.pop("harvest", None) or {}), layer=layer, hook_name=hook_name,
                        context_length=context_length, batch_size=harvest_batch_size, max_tokens=max_tokens,
                        device=device)
    if reading and "layer" not in reading:
        from mneme_plugin.crosscoder.provenance import recorded_reading
        from mneme_plugin.formats import load_crosscoder

        reading = {**recorded_reading(load_crosscoder(crosscoder_dir)), **reading}
    cfg = CollectConfig.from_dict(_override(
        section, latents=ids(latents), classes=classes.split(",") if classes else None, per_class=per_class,
        reference_latents=reference_latents, n_top=n_top, harvest=reading or None,
        allow_hook_mismatch=allow_hook_mismatch or None,
    ), section="collect")
    _unmark_run_stages(out, "collect")
    result = run_collect(base, edited, crosscoder_dir, source, cfg, out_dir=out, attribution=attribution)
    fired = sum(1 for p in result.per_latent if p["top_rows"])
    click.echo(f"Contexts of {len(result.latents)} latents ({fired} fired) over {result.n_tokens:,} tokens -> {out}")


@main.command()
@click.argument("contexts_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with section explain (client as a sub-mapping).")
@click.option("--explainer", type=click.Choice(EXPLAINERS))
@click.option("--client", "client_kind", type=click.Choice(CLIENTS))
@click.option("--model", help="LLM name (client model).")
@click.option("--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
@click.option("--api-key", help="API key, or env:VARNAME.")
@click.option("--concurrency", type=int, help="Concurrent LLM requests.")
@click.option("--scorer", "scorers", multiple=True, type=click.Choice(SCORERS), help="Delphi scorer (repeatable).")
@click.option("--tokenizer", help="Tokenizer folder (default: the one saved by collect).")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (default: CONTEXTS_DIR).")
@clear_errors
def explain(contexts_dir, config, explainer, client_kind, model, base_url, api_key, concurrency, scorers, tokenizer,
            out) -> None:
    """Describe each collected latent (offline log-odds explainer, or Delphi's explainers via an LLM)."""
    from mneme_plugin.interpret import ExplainConfig
    from mneme_plugin.interpret import explain as run_explain
    from mneme_plugin.interpret.explain import has_explanation
    from mneme_plugin.interpret.files import EXPLANATIONS_PARQUET

    sections = _sections(_read_yaml(config), ("explain",), config)
    section = dict(sections["explain"])
    client = _override(dict(section.pop("client", None) or {}), kind=client_kind, model=model, base_url=base_url,
                       api_key=api_key, concurrency=concurrency)
    cfg = ExplainConfig.from_dict(_override(section, explainer=explainer, scorers=list(scorers) or None, client=client),
                                  section="explain")
    _unmark_run_stages(out or contexts_dir, "explain")
    table = run_explain(contexts_dir, cfg, out_dir=out, tokenizer=tokenizer)
    for row, has in zip(table.head(20).itertuples(), has_explanation(table).head(20)):
        click.echo(f"{row.latent:>8}  {row.explanation if has else '(unparsed answer: no explanation)'}")
    click.echo(f"{len(table)} explanations -> {Path(out or contexts_dir) / EXPLANATIONS_PARQUET} (+ .csv)")


@main.command("map")
@click.argument("explanations", type=click.Path(exists=True))
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with section map (client as a sub-mapping).")
@click.option("--taxonomy", "taxonomies", multiple=True,
              help="A built-in taxonomy (see `mneme taxonomies`) or a YAML/JSON file; repeatable.")
@click.option("--method", type=click.Choice(MAPPERS))
@click.option("--labeler", type=click.Choice(LABELERS))
@click.option("--top-k", type=int)
@click.option("--embedding-model", help="Local sentence-transformers folder (method embedding).")
@click.option("--client", "client_kind", type=click.Choice(MAP_CLIENTS))
@click.option("--model", help="LLM name (client model).")
@click.option("--base-url", help="OpenAI-compatible base URL.")
@click.option("--api-key", help="API key, or env:VARNAME.")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (default: next to the explanations).")
@clear_errors
def map_(explanations, config, taxonomies, method, labeler, top_k, embedding_model, client_kind, model, base_url,
         api_key, out) -> None:
    """Label each explanation and map it to the nearest taxonomy entries (categories.parquet + .csv)."""
    from mneme_plugin.interpret import MapConfig, map_descriptions
    from mneme_plugin.interpret.files import CATEGORIES_PARQUET

    sections = _sections(_read_yaml(config), ("map",), config)
    section = dict(sections["map"])
    client = _override(dict(section.pop("client", None) or {}), kind=client_kind, model=model, base_url=base_url,
                       api_key=api_key)
    cfg = MapConfig.from_dict(_override(section, taxonomies=list(taxonomies) or None, method=method, labeler=labeler,
                                        top_k=top_k, embedding_model=embedding_model, client=client), section="map")
    src = Path(explanations)
    out_dir = Path(out) if out else (src if src.is_dir() else src.parent)
    _unmark_run_stages(out_dir, "map")
    table = map_descriptions(src, cfg, out_dir=out_dir)
    for row in table.head(20).itertuples():
        # A description that shares no term with any entry has no category (None; NaN once in a table).
        category = row.category if isinstance(row.category, str) else "(no match)"
        click.echo(f"{row.latent:>8}  [{row.taxonomy}] {category}  ({row.score:.2f})  {row.label}")
    if len(table) > 20:
        click.echo(f"... ({len(table) - 20} more rows)")
    matched = "; ".join(f"{name}: {rows['category'].notna().sum()} of {len(rows)}"
                        for name, rows in table.groupby("taxonomy", sort=False))
    click.echo(f"Latents matched to a category: {matched}")
    click.echo(f"{len(table)} rows -> {out_dir / CATEGORIES_PARQUET} (+ .csv)")


@main.command()
@click.argument("taxonomy", required=False)
@clear_errors
def taxonomies(taxonomy) -> None:
    """List the built-in taxonomies (for `mneme map --taxonomy` and map.taxonomies); with TAXONOMY (a
    built-in or a YAML/JSON file), its category ids and names (what a ground-truth table's categories are)."""
    from mneme_plugin.interpret.taxonomy import builtin_taxonomies, load_taxonomy

    if taxonomy:
        for entry in load_taxonomy(taxonomy).entries:
            click.echo(f"{entry.id:<40} {entry.name}")
        return
    for name in builtin_taxonomies():
        click.echo(f"{name:<24} {len(load_taxonomy(name).entries)} categories")


# --------------------------------------------------------------------------------- predict / evaluate / report / run

@main.command()
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run directory holding attribution/ and mapping/.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML with sections predict and map; its keys replace those of RUN_DIR/config.yaml (a pooled folder: its first run's), the others stay.")
@click.option("--taxonomy", help="Taxonomy to predict over (default: the first of map.taxonomies; in a folder "
              "without config.yaml, the first its mapping holds).")
@click.option("--rule", type=click.Choice(RULES),
              help="Prediction rule: " + "; ".join(f"{k}: {v}" for k, v in RULE_SUMMARIES.items()) + ".")
@click.option("--side", type=click.Choice(SIDES), help="Which changed latents are scored: suppressed (the classes "
              "predict.suppressed_classes names), amplified (predict.amplified_classes) or both (the default).")
@click.option("-k", "--k", type=int, help="Categories predicted by the top_k rule.")
@click.option("--alpha", type=float, help="Level of the enrichment (FDR) and outlier_or_broad / outlier_plus_broad "
              "rules' tests.")
@click.option("--control-run", type=click.Path(exists=True, file_okay=False),
              help="outlier_or_broad / outlier_plus_broad: a finished run of the base vs a benignly perturbed copy "
              "(the breadth test's scale).")
@clear_errors
def predict(run_dir, config, taxonomy, rule, side, k, alpha, control_run) -> None:
    """Score every category from the attributed latents and their categories; predict the affected ones."""
    from mneme_plugin.interpret import MapConfig
    from mneme_plugin.sideeffects import PredictConfig, predict_run
    from mneme_plugin.sideeffects.steps import prediction_target

    run_config = _run_config(run_dir)
    sections = _run_sections(run_config, config, ("predict", "map"), from_run=("predict", "map"))
    cfg = PredictConfig.from_dict(_override(sections["predict"], rule=rule, side=side, k=k, alpha=alpha,
                                            control_run=control_run),
                                  section="predict")
    map_taxonomies = (MapConfig.from_dict(sections["map"], section="map").taxonomies
                      if "taxonomies" in sections["map"] else None)
    taxonomy, out = prediction_target(run_dir, taxonomy, run_config.taxonomies() if run_config is not None else None,
                                      map_taxonomies)
    # The run's markers go once the prediction is made, before it replaces the old one (a refused
    # prediction writes nothing and leaves them).
    result = predict_run(run_dir, cfg, taxonomy, out_dir=out, before_write=lambda: _unmark_run_stages(out, "predict"))
    q_columns = [c for c in result.scores.columns if c.startswith("q_")]
    for _, row in result.scores.head(15).iterrows():
        q = f"  q {min(row[c] for c in q_columns):.3g}" if q_columns else ""
        click.echo(f"{'*' if row['predicted'] else ' '} {row['category']:<40} {row['score']:8.4f}{q}")
    if "verdict" in result.tests:
        # Without a control run the verdict comes alone ("no control: the outlier rule").
        tests = result.tests
        p_values = ", ".join(f"{name} p {tests[f'{name}_p']:.3g}" for name in ("concentration", "breadth")
                             if f"{name}_p" in tests)
        click.echo(f"Change: {tests['verdict']}" + (f" ({p_values})" if p_values else ""))
    click.echo(f"Predicted: {', '.join(result.predicted) or '(none)'}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Where the pooled prediction goes (OUT/prediction/; `mneme evaluate --run-dir OUT` scores it).")
@click.option("--min-votes", type=int, help="Runs that must predict a category (default: a majority).")
@click.option("--taxonomy", help="Which taxonomy's prediction, for runs that predict several (default: the first).")
@clear_errors
def pool(run_dirs, out, min_votes, taxonomy) -> None:
    """Pool the predictions of runs on the same edit whose crosscoders differ (e.g. training seeds) by vote."""
    from mneme_plugin.sideeffects.steps import pool_runs

    result = pool_runs(list(run_dirs), out, taxonomy=taxonomy, min_votes=min_votes)
    voted = result.scores[result.scores["votes"] > 0]
    for _, row in voted.iterrows():
        click.echo(f"{'*' if row['predicted'] else ' '} {row['category']:<40} {int(row['votes'])} of {len(run_dirs)}")
    if len(voted) < len(result.scores):  # a taxonomy of 57 categories would list 50-odd zeros
        others = len(result.scores) - len(voted)
        click.echo(f"  ({others} other {'category' if others == 1 else 'categories'}: no run predicted "
                   f"{'it' if others == 1 else 'them'})")
    click.echo(f"Predicted: {', '.join(result.predicted) or '(none)'}")


@main.command()
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run directory with a prediction, or a folder written by `mneme pool`.")
@click.option("--scores-csv", type=click.Path(exists=True, dir_okay=False), help="category, before, after[, n][, p_value].")
@click.option("--lm-eval-before", type=click.Path(exists=True, dir_okay=False))
@click.option("--lm-eval-after", type=click.Path(exists=True, dir_okay=False))
@click.option("--intervention", help="Plain-text description of the edit, for the naive baseline (default: the "
              "run's models.intervention).")
@click.option("--drop-threshold", type=float,
              help="A category is degraded when its score drops by more than this (see EvaluateConfig).")
@click.option("--significance", type=float,
              help="Also require the drop to be significant at this level: the table's own p_value, else "
                   "Fisher's exact test on its n (see EvaluateConfig).")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML with sections evaluate, ground_truth, map; its keys replace those of RUN_DIR/config.yaml (a pooled folder: its first run's), the others stay. Without a ground truth here or in the options, the run's own.")
@clear_errors
def evaluate(run_dir, scores_csv, lm_eval_before, lm_eval_after, intervention, drop_threshold, significance,
             config) -> None:
    """Compare the prediction with the observed per-category drops: Eq. 4 accuracy, precision, recall, F1."""
    from mneme_plugin.groundtruth import GroundTruthConfig
    from mneme_plugin.interpret import MapConfig
    from mneme_plugin.sideeffects import EvaluateConfig, evaluate_run

    run_config = _run_config(run_dir)
    sections = _run_sections(run_config, config, ("evaluate", "ground_truth", "map"),
                             from_run=("evaluate", "map", "models"))
    cfg = EvaluateConfig.from_dict(_override(sections["evaluate"], drop_threshold=drop_threshold,
                                             significance=significance), section="evaluate")
    truth = GroundTruthConfig.from_dict(_override(sections["ground_truth"], scores_csv=scores_csv,
                                                  lm_eval_before=lm_eval_before, lm_eval_after=lm_eval_after),
                                        section="ground_truth")
    if not truth.available and run_config is not None and run_config.ground_truth.available:
        # None given: the run's own (re-scoring a run with another --drop-threshold needs no other file).
        own = run_config.ground_truth
        if own.tables:
            raise ConfigError(
                f"No ground truth given, and the run's own is in named tables ({', '.join(own.tables)}), which "
                f"`mneme run` scores: pass --scores-csv (a measured table is at {RunLayout(Path(run_dir)).ground_truth}"
                "/NAME.csv), or change the run config's evaluate section and run `mneme run CONFIG --only evaluate`.")
        truth = GroundTruthConfig.from_dict({k: v for k, v in own.to_dict().items() if k != "tables"},
                                            section="ground_truth")
        click.echo(f"Ground truth: the run's own ({', '.join(truth.files())}).")
    if not truth.available:
        raise ConfigError("No ground truth: pass --scores-csv or --lm-eval-before/--lm-eval-after.")
    # The naive baseline reads the edit's description: --intervention, else the run's models.intervention.
    # The run's markers go once the evaluation is made, before it replaces the old one (as predict's).
    result = evaluate_run(run_dir, cfg, truth, MapConfig.from_dict(sections["map"], section="map"),
                          intervention=intervention or sections.get("models", {}).get("intervention") or "",
                          before_write=lambda: _unmark_run_stages(RunLayout(Path(run_dir)).evaluation, "evaluate"))
    click.echo(f"Degraded: {', '.join(result.true_set) or '(none)'}")
    click.echo(result.markdown())


@main.command()
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Run directory holding attribution/, contexts/ (collected for the changed latents) and prediction/ (for --target predicted).")
@click.option("--edited", required=True, help="The edited model: HF name or local folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Where the retrained model goes.")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with section remediate.")
@click.option("--target", type=click.Choice(list(REMEDIATION_TARGETS)),
              help="Which changed latents: " + "; ".join(f"{k}: {v}" for k, v in REMEDIATION_TARGETS.items())
                   + " (default: predicted).")
@click.option("--classes", help="Comma-separated attribution classes whose top contexts to retrain on "
                                "(default: every changed class; base_only,suppressed for the lost latents only).")
@click.option("--steps", type=int, help="Retraining steps.")
@click.option("--lr", type=float, help="Retraining learning rate.")
@click.option("--lora/--no-lora", default=None, help="LoRA through peft (when installed).")
@clear_errors
def remediate(run_dir, edited, out, config, target, classes, steps, lr, lora) -> None:
    """Retrain the edited model on the corpus samples that most activate the changed latents behind the
    predicted side effects (--target changed: behind every change)."""
    if edited.startswith("organism:"):
        raise ConfigError("mneme remediate retrains Hugging Face models (a hub name or a local folder); the CPU "
                          "organism's cases are remediated by `mneme demo` (`organism.demo`), which trains them itself.")
    from mneme_plugin.activations.models import require_model
    from mneme_plugin.attribution import load_attribution
    from mneme_plugin.interventions.hf_models import load_causal_lm
    from mneme_plugin.interpret.contexts import load_contexts
    from mneme_plugin.sideeffects import (
        RemediateConfig, remediate as run_remediate, remediation_latents, save_remediation, select_samples,
    )
    from mneme_plugin.sideeffects.remediate import check_edited_for_run

    sections = _sections(_read_yaml(config), ("remediate",), config)
    cfg = RemediateConfig.from_dict(_override(sections["remediate"], target=target, steps=steps, lr=lr, lora=lora,
                                              classes=classes.split(",") if classes else None), section="remediate")
    layout = RunLayout(Path(run_dir))
    samples, latents = select_samples(load_contexts(layout.contexts), load_attribution(layout.attribution).table, cfg,
                                      remediation_latents(run_dir, cfg))
    click.echo(f"{len(samples)} samples from the top contexts of {len(latents)} latents ({', '.join(cfg.classes)}; "
               f"target {cfg.target}).")
    require_model(edited, "--edited")
    model, tokenizer = load_causal_lm(edited, device="cpu", dtype="float32")
    check_edited_for_run(run_dir, edited, tokenizer)
    result = run_remediate(model, samples, cfg, latents=latents)
    click.echo(f"Retrained model: {save_remediation(result, out, tokenizer=tokenizer) / 'model'}")


@main.command()
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="HTML file (default RUN_DIR/report.html).")
@clear_errors
def report(run_dir, out) -> None:
    """Write the run's self-contained HTML report (plots, top latents, predictions, metrics)."""
    from mneme_plugin.report.build import build_report

    click.echo(f"Report: {build_report(run_dir, out)}")


def _relaunch_if_asked(nproc: int) -> None:
    """``--nproc N`` (N > 1): run this very command as N ranks under ``torchrun --standalone``."""
    if nproc == 1:
        return
    import sys

    from mneme_plugin.distributed import relaunch_under_torchrun, strip_option

    relaunch_under_torchrun(nproc, "mneme_plugin.cli", strip_option(sys.argv[1:], "--nproc"))


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Check the config and print the plan; run nothing.")
@click.option("--only", multiple=True, help="Run only these stages (repeatable).")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Ranks on this node for harvest and training: relaunches this command under torchrun.")
@click.option("--no-disk-check", is_flag=True,
              help="Start even when the stages' estimated writes exceed the free disk (each stage still checks its own).")
@clear_errors
def run(config, dry_run, only, nproc, no_disk_check) -> None:
    """Run the whole pipeline from one YAML file: [intervention, ground_truth,] harvest, train, attribute,
    collect, explain, map, predict, evaluate, report. Finished stages with the same config are skipped; interrupted ones resume."""
    from mneme_plugin.pipeline import RunConfig, check_config, format_plan, run_pipeline
    from mneme_plugin.sideeffects import load_evaluations

    cfg = RunConfig.from_yaml(config)
    if dry_run:
        check = check_config(cfg, list(only) or None, world_size=nproc)
        click.echo(format_plan(cfg, check, list(only) or None))
        if check.problems:
            raise SystemExit(1)
        return
    if nproc > 1:  # a batch the ranks cannot split: one error here, not one per rank under torchrun
        from mneme_plugin.pipeline.run import check_batch_shared
        from mneme_plugin.pipeline.stages import STAGES

        check_batch_shared(cfg, STAGES, list(only) or None, nproc)
    _relaunch_if_asked(nproc)
    layout = run_pipeline(cfg, only=list(only) or None, check_disk=not no_disk_check)
    from mneme_plugin.distributed import distributed_context

    if not distributed_context().is_main:  # under torchrun rank 0 ran the last stages and reports
        return
    click.echo(f"Run directory: {layout.root}")
    if layout.report.is_file():
        click.echo(f"Report: {layout.report}")
    if layout.evaluation.is_dir():
        for name, evaluation in load_evaluations(layout.evaluation).items():
            click.echo((f"{name} (taxonomy {evaluation.taxonomy}):\n" if name else "") + evaluation.markdown())


from mneme_plugin.commands.groundtruth import groundtruth  # noqa: E402
from mneme_plugin.commands.intervene import intervene  # noqa: E402

main.add_command(intervene)
main.add_command(groundtruth)


def entry_point() -> None:
    """``mneme`` and ``python -m mneme_plugin.cli`` (what torchrun runs): ``main``, with a rank's error
    recorded for torchrun's failure summary (``commands.common.run_recorded``)."""
    run_recorded(main)


if __name__ == "__main__":  # pragma: no cover
    entry_point()
