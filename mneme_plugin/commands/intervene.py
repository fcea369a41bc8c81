"""``mneme intervene rmu|sft``: edit a Hugging Face causal LM and write the edited model folder."""

from __future__ import annotations

import click

from mneme_plugin.commands.common import add_options, build_config, clear_errors, config_options

_model_options = [
    click.option("--model", help="HF model name or local folder (overrides the config's `model`)."),
    click.option("--device", help="cpu, cuda, cuda:1, auto (bf16 on GPU)."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
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
def rmu(config, preset, out, model, device, overwrite, forget_corpora, retain_corpora, max_num_batches) -> None:
    """RMU unlearning (the WMDP algorithm); presets zephyr_rmu, llama3_rmu."""
    from mneme_plugin.interventions.hf_models import save_intervention
    from mneme_plugin.interventions.hf_rmu import HFRMUConfig, rmu_unlearn_hf

    cfg = build_config(HFRMUConfig, preset, config, model=model, device=device,
                       forget_corpora=list(forget_corpora) or None, retain_corpora=list(retain_corpora) or None,
                       max_num_batches=max_num_batches)
    _refuse_existing(out, overwrite)
    result = rmu_unlearn_hf(cfg)
    click.echo(f"Unlearned model: {save_intervention(result, out, overwrite=overwrite)}")


@intervene.command()
@add_options(config_options + _model_options)
@click.option("--data", help="Training data: .jsonl/.parquet file or hf:NAME[@CONFIG][:SPLIT].")
@click.option("--epochs", type=int)
@click.option("--lr", type=float)
@clear_errors
def sft(config, preset, out, model, device, overwrite, data, epochs, lr) -> None:
    """Supervised fine-tuning on chat or Alpaca data, loss on responses only (full or LoRA).

    Presets: emergent_misalignment_sft, aoa_sft, alpaca_sft."""
    from mneme_plugin.interventions.hf_models import save_intervention
    from mneme_plugin.interventions.sft import SFTConfig, supervised_fine_tune

    cfg = build_config(SFTConfig, preset, config, model=model, device=device, data=data, epochs=epochs, lr=lr)
    _refuse_existing(out, overwrite)
    result = supervised_fine_tune(cfg)
    click.echo(f"Fine-tuned model: {save_intervention(result, out, overwrite=overwrite)}")


@click.command("presets")
def presets() -> None:
    """List the shipped presets (interventions and ground truth)."""
    from mneme_plugin.presets import list_presets, preset_description

    for name in list_presets():
        click.echo(f"{name}: {preset_description(name)}")


intervene.add_command(presets)


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Fail before training, not after it, when the output folder exists."""
    from pathlib import Path

    from mneme_plugin.errors import ConfigError

    if Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
