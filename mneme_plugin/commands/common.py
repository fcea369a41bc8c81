"""Shared pieces of the command modules: one-line errors and preset + YAML + option configs."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from mneme_plugin.errors import MnemeError


def _train_hint(params: dict[str, Any]) -> str:
    from mneme_plugin.checkpoints import latest_checkpoint

    newest = latest_checkpoint(params.get("out") or ".")
    if newest is None:
        return ("no checkpoint was written yet (one every training.checkpoint_every steps), so the same command "
                "starts over")
    return f"run the same command again to resume from the newest checkpoint, {newest}"


# What to do after Ctrl-C, per command (its click name): the commands that resume when run again (a
# function of the command's parameters where the answer depends on what it left).
RESUME_HINTS: dict[str, Any] = {
    "harvest": "run the same command again to resume the harvest where it stopped",
    "train": _train_hint,
    "run": "run the same command again: finished stages are skipped, and an interrupted intervention, "
           "harvest or training resumes from where it stopped",
    **dict.fromkeys(("rmu", "sft"), "run the same command again to resume from the newest checkpoint in --out "
                                    "(--no-resume starts over)"),
}
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def clear_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print the package's errors as one clear line instead of a traceback, and on Ctrl-C say whether
    and how the command resumes (click alone prints "Aborted!")."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MnemeError as err:
            record_for_torchrun(err)
            raise click.ClickException(str(err)) from err
        except KeyboardInterrupt:
            context = click.get_current_context(silent=True)
            hint = RESUME_HINTS.get(context.info_name if context is not None else "")
            hint = hint(context.params) if callable(hint) else hint
            click.echo("\nInterrupted" + (f": {hint}." if hint else "."), err=True)
            sys.exit(INTERRUPTED_EXIT_CODE)

    return wrapper


def record_for_torchrun(err: BaseException) -> None:
    """Under torchrun, write ``err`` to this rank's error file (torch elastic's ``TORCHELASTIC_ERROR_FILE``),
    so that torchrun's failure summary names it as the root cause; a clear one-line error of ours is
    otherwise only the rank's exit code 1 there, beside the other ranks' collective errors."""
    import os

    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    get_error_handler().record_exception(err)


def run_recorded(command: Callable[..., Any]) -> None:
    """Run the click ``command`` as a program. Under torchrun (``--nproc``, or torchrun started by hand) it
    runs inside torch elastic's ``record``: an exception on any rank (a CUDA out-of-memory in a training
    step, a store shard one rank cannot read) becomes torchrun's "Root Cause (first observed failure)"
    with the rank and traceback, instead of the NCCL / gloo errors it causes on the other ranks."""
    import os

    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import record

        record(command)()
    else:
        command()


def build_config(cls: Any, preset_kind: str, preset: str | None, config: str | None, **overrides: Any) -> Any:
    """``cls`` from a shipped preset (of ``preset_kind``, ``presets.PRESET_KINDS``), then the keys of a YAML
    file, then command-line values (not None)."""
    from mneme_plugin.config import read_yaml_mapping
    from mneme_plugin.presets import merged_config

    data = merged_config(preset, read_yaml_mapping(config) if config else {}, preset_kind)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls.from_dict(data)


config_options = [
    click.option("--config", type=click.Path(dir_okay=False), help="YAML whose keys are the config's fields."),
    click.option("--preset", help="A shipped preset by name (`mneme intervene presets` lists them); --config overrides it."),
    click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder."),
]


def add_options(options: list[Callable[..., Any]]) -> Callable[..., Any]:
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorator
