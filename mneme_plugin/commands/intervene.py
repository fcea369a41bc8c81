"""``mneme intervene rmu|sft``: edit a Hugging Face causal LM and write the edited model folder."""

from __future__ import annotations

import click

from mneme_plugin.commands.common import add_options, build_config, clear_errors, config_options

_model_options = [
    click.option("--model", help="HF model name or local folder (overrides the config's `model`)."),
    click.option("--device", help="cpu, cuda, cuda:1, auto (bf16 on GPU)."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
    click.option("--no-resume", is_flag=True,
                 help="Start over even if the output folder holds an interrupted run's checkpoints."),
]


@click.group()
def intervene() -> None:
    """Edit a model: RMU unlearning or supervised fine-tuning (full or LoRA)."""


@intervene.command()
@add_options(config_options + _model_options)
@click.option("--forget", "forget_corpora", multiple=True, help="Forget corpus spec (repeatable).")
@click.option("--retain", "retain_corpora", multiple=True, help="Retain corpus spec (repeatable).")
@click.option("--max-num-batches", type=int)
@clear_errors
def rmu(config, preset, out, model, device, overwrite, no_resume, forget_corpora, retain_corpora,
        max_num_batches) -> None:
    """RMU unlearning (the WMDP algorithm); its presets: `mneme intervene presets`.

    Checkpoints every checkpoint_every steps in --out; run again to resume an interrupted run."""
    from mneme_plugin.interventions.checkpoints import train_and_save
    from mneme_plugin.interventions.hf_rmu import HFRMUConfig, rmu_unlearn_hf

    cfg = build_config(HFRMUConfig, "rmu", preset, config, model=model, device=device,
                       forget_corpora=list(forget_corpora) or None, retain_corpora=list(retain_corpora) or None,
                       max_num_batches=max_num_batches)
    out_dir = train_and_save(rmu_unlearn_hf, cfg, out, overwrite=overwrite, resume=not no_resume)
    click.echo(f"Unlearned model: {out_dir}")


@intervene.command()
@add_options(config_options + _model_options)
@click.option("--data", help="Training data: .jsonl/.parquet file or hf:NAME[@CONFIG][:SPLIT].")
@click.option("--epochs", type=int)
@click.option("--lr", type=float)
@clear_errors
def sft(config, preset, out, model, device, overwrite, no_resume, data, epochs, lr) -> None:
    """Supervised fine-tuning on chat or Alpaca data, loss on responses only (full or LoRA).

    Presets: `mneme intervene presets`. Checkpoints every checkpoint_every
    optimiser steps in --out; run again to resume an interrupted run."""
    from mneme_plugin.interventions.checkpoints import train_and_save
    from mneme_plugin.interventions.sft import SFTConfig, supervised_fine_tune

    cfg = build_config(SFTConfig, "sft", preset, config, model=model, device=device, data=data, epochs=epochs, lr=lr)
    out_dir = train_and_save(supervised_fine_tune, cfg, out, overwrite=overwrite, resume=not no_resume)
    click.echo(f"Fine-tuned model: {out_dir}")


@click.command("presets")
@click.argument("name", required=False)
@clear_errors
def presets(name) -> None:
    """List the shipped presets (interventions and ground truth) by the command they are for;
    with NAME, print that preset's YAML (its keys are the config's fields: copy it to --config
    and change what you need)."""
    import textwrap

    from mneme_plugin.presets import PRESET_KINDS, list_presets, preset_description, preset_text

    if name:
        click.echo(preset_text(name), nl=False)
        return
    for kind, where in PRESET_KINDS.items():
        click.echo(f"For {where}:")
        for preset in list_presets(kind):
            click.echo(textwrap.fill(preset_description(preset), width=100, initial_indent=f"  {preset}: ",
                                     subsequent_indent="      ", break_long_words=False,
                                     break_on_hyphens=False))


intervene.add_command(presets)

