"""``mneme``: the command line, a thin click layer over the Python API.

Each stage has a subcommand. Options given on the command line override the matching keys of
the stage's YAML config (``--config``), whose keys are the fields of the stage's dataclass.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from mneme_plugin.errors import ConfigError, MnemeError


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mneme_plugin")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _clear_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print the package's errors as one clear line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MnemeError as err:
            raise click.ClickException(str(err)) from err

    return wrapper


def _read_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"Config file {path} does not exist.") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping, got {type(data).__name__}.")
    return data


def _sections(data: dict[str, Any], allowed: tuple[str, ...], path: str | None) -> dict[str, dict[str, Any]]:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown section(s) {unknown} in {path}; expected {list(allowed)}.")
    return {name: dict(data.get(name) or {}) for name in allowed}


def _override(section: dict[str, Any], **values: Any) -> dict[str, Any]:
    """Command-line values (not None) override the YAML's."""
    return {**section, **{k: v for k, v in values.items() if v is not None}}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mneme-plugin")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """MNEME: find what else changed when a model was fine-tuned or unlearned.

    Stages: harvest paired activations, train a crosscoder, inspect outputs with info.
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
    click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), help="Storage dtype."),
    click.option("--model-dtype", type=click.Choice(["float32", "bfloat16", "float16"])),
    click.option("--device", help="Device for the models (cpu, cuda, cuda:1...)."),
]


def _add_options(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorator


def _harvest_inputs(sections: dict[str, dict[str, Any]], base, edited, corpus, layer, hook_name, max_tokens,
                    context_length, harvest_batch_size, dtype, model_dtype, device):
    """(base, edited, corpus, HarvestConfig) from the YAML sections models / corpus / harvest and options."""
    from mneme_plugin.activations import HarvestConfig
    from mneme_plugin.activations.corpus import corpus_from_spec

    models = _override(sections["models"], base=base, edited=edited)
    for key in ("base", "edited"):
        if not models.get(key):
            raise ConfigError(f"No {key} model: pass --{key} or set models.{key} in the config.")
    corpus_spec = corpus or sections["corpus"].get("source")
    if not corpus_spec:
        raise ConfigError("No corpus: pass --corpus or set corpus.source in the config.")
    harvest_cfg = HarvestConfig.from_dict(
        _override(
            sections["harvest"], layer=layer, hook_name=hook_name, max_tokens=max_tokens,
            context_length=context_length, batch_size=harvest_batch_size, dtype=dtype,
            model_dtype=model_dtype, device=device,
        )
    )
    return models["base"], models["edited"], corpus_from_spec(str(corpus_spec)), harvest_cfg


@main.command()
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with sections models, corpus, harvest.")
@_add_options(_harvest_options)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Activation store directory.")
@click.option("--overwrite", is_flag=True, help="Delete an existing store at --out first.")
@_clear_errors
def harvest(config, out, overwrite, **options) -> None:
    """Harvest paired (base, edited) activations into an on-disk store.

    An interrupted harvest resumes when run again with the same options.
    """
    from mneme_plugin.activations import harvest as run_harvest

    sections = _sections(_read_yaml(config), ("models", "corpus", "harvest"), config)
    base, edited, corpus, harvest_cfg = _harvest_inputs(sections, **options)
    store = run_harvest(base, edited, corpus, harvest_cfg, out, overwrite=overwrite)
    click.echo(f"{store.num_rows} paired rows of width {store.d_model} in {store.path}")


# --------------------------------------------------------------------------------- train

@main.command()
@click.option("--store", type=click.Path(exists=True, file_okay=False), help="Activation store to train on.")
@click.option("--stream", is_flag=True, help="Harvest on the fly into a shuffle buffer instead of a store.")
@click.option("--config", type=click.Path(dir_okay=False),
              help="YAML with sections crosscoder, training (and models, corpus, harvest for --stream).")
@_add_options(_harvest_options)
@click.option("--shuffle-buffer", type=int, default=262_144, show_default=True, help="Rows in the stream's buffer.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--dict-size", type=int, help="Number of latents (default expansion_factor * d_model).")
@click.option("--expansion-factor", type=int)
@click.option("-k", "--k", type=int, help="Average active latents per token (BatchTopK).")
@click.option("--salience", type=click.Choice(["paper", "crosscoder", "sae", "mixed", "none"]))
@click.option("--steps", type=int)
@click.option("--train-batch-size", type=int, help="Tokens per optimisation step.")
@click.option("--lr", type=float)
@click.option("--seed", type=int)
@click.option("--train-device", help="Device for training (auto, cpu, cuda).")
@click.option("--no-resume", is_flag=True, help="Start over even if the run directory has checkpoints.")
@_clear_errors
def train(store, stream, config, shuffle_buffer, out, dict_size, expansion_factor, k, salience, steps,
          train_batch_size, lr, seed, train_device, no_resume, **harvest_options) -> None:
    """Train a BatchTopK crosscoder, from a store or streaming; resumes from the newest checkpoint."""
    from mneme_plugin.crosscoder import CrossCoderConfig, TrainingConfig
    from mneme_plugin.crosscoder.training import train as run_train

    sections = _sections(_read_yaml(config), ("crosscoder", "training", "models", "corpus", "harvest"), config)
    cc_cfg = CrossCoderConfig.from_dict(
        _override(sections["crosscoder"], dict_size=dict_size, expansion_factor=expansion_factor, k=k, salience=salience)
    )
    tr_cfg = TrainingConfig.from_dict(
        _override(sections["training"], steps=steps, batch_size=train_batch_size, lr=lr, seed=seed, device=train_device)
    )
    if store and stream:
        raise ConfigError("Pass either --store or --stream, not both.")
    if stream:
        from mneme_plugin.activations import harvest_stream

        base, edited, corpus, harvest_cfg = _harvest_inputs(sections, **harvest_options)
        data: Any = harvest_stream(base, edited, corpus, harvest_cfg, batch_size=tr_cfg.batch_size,
                                   shuffle_buffer_rows=shuffle_buffer, seed=tr_cfg.seed)
    elif store:
        data = store
    else:
        raise ConfigError("Nothing to train on: pass --store DIR, or --stream with --base/--edited/--corpus/--layer.")
    result = run_train(data, out, cc_cfg, tr_cfg, resume=not no_resume)
    click.echo(f"Crosscoder: {result.crosscoder_dir}")
    click.echo(json.dumps(result.metrics.to_dict(), indent=2))


# --------------------------------------------------------------------------------- demo

@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@_clear_errors
def demo(out: str, seed: int) -> None:
    """Run the built-in CPU demo: train a tiny LM, fine-tune a copy on one domain, harvest both,
    train a crosscoder between them, and print its quality."""
    from mneme_plugin.organism import run_demo

    result = run_demo(out, seed=seed)
    metrics = result.training.metrics
    click.echo(f"\nBase LM vs. its copy fine-tuned on {result.fine_tuned_domain}:")
    click.echo(f"  activations:  {result.store.path} ({result.store.num_rows:,} paired tokens)")
    click.echo(f"  crosscoder:   {result.training.crosscoder_dir}")
    click.echo(f"  explained variance base {metrics.explained_variance_base:.3f}, "
               f"edited {metrics.explained_variance_edited:.3f}; L0 {metrics.l0:.1f}; "
               f"dead {metrics.dead_fraction:.1%}")


# --------------------------------------------------------------------------------- info

@main.command()
@click.argument("path", type=click.Path(exists=True))
@_clear_errors
def info(path: str) -> None:
    """Describe what PATH holds: an activation store, a crosscoder, or a training run."""
    from mneme_plugin.inspect import describe_path

    click.echo(describe_path(path))


# --------------------------------------------------------------------------------- attribute

@main.command()
@click.option("--crosscoder", "crosscoder_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Crosscoder directory (or a training run directory holding crosscoder/).")
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False),
              help="Activation store to stream over (every row once).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the attribution table.")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML with section attribution.")
@click.option("--batch-size", type=int, help="Rows encoded at a time.")
@click.option("--device", help="Device (auto, cpu, cuda).")
@_clear_errors
def attribute(crosscoder_dir, store, out, config, batch_size, device) -> None:
    """Decoder norms, latent scaling and a class (suppressed .. amplified) for every latent."""
    from mneme_plugin.attribution import AttributionConfig, format_counts, format_delta_histogram
    from mneme_plugin.attribution import attribute as run_attribute

    sections = _sections(_read_yaml(config), ("attribution",), config)
    attr_cfg = AttributionConfig.from_dict(_override(sections["attribution"], batch_size=batch_size, device=device))
    result = run_attribute(crosscoder_dir, store, attr_cfg, out_dir=out)
    click.echo(format_counts(result.summary))
    click.echo(format_delta_histogram(result.summary))
    click.echo(f"Table: {Path(out) / 'attribution.parquet'} (+ .csv), summary: {Path(out) / 'attribution_summary.json'}")


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
@_clear_errors
def import_(source, out, subfolder, revision, scale_factors) -> None:
    """Import a crosscoder (science-of-finetuning, Kissane, a mneme SAE-Lens export; folder or hub id)."""
    from mneme_plugin.formats import load_crosscoder

    cc = load_crosscoder(source, subfolder=subfolder, revision=revision,
                         scale_factors=_parse_scale_factors(scale_factors))
    path = cc.save_pretrained(out)
    cfg = cc.cfg
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
@_clear_errors
def export_saelens_command(source, out, folder, hook_name, base_model, edited_model, views, subfolder, revision,
                           scale_factors) -> None:
    """Write SOURCE (any crosscoder mneme reads) as SAE-Lens jumprelu SAEs over concat(base, edited)."""
    from mneme_plugin.formats import export_saelens, load_crosscoder

    cc = load_crosscoder(source, subfolder=subfolder, revision=revision,
                         scale_factors=_parse_scale_factors(scale_factors))
    written = export_saelens(cc, out, folder=folder, hook_name=hook_name, base_model=base_model,
                             edited_model=edited_model, views=views)
    for view, path in written.items():
        click.echo(f"{view}: {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
