"""Shared pieces of the command modules: one-line errors and preset + YAML + option configs."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from mneme_plugin.errors import MnemeError


def clear_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print the package's errors as one clear line instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MnemeError as err:
            raise click.ClickException(str(err)) from err

    return wrapper


def build_config(cls: Any, preset: str | None, config: str | None, **overrides: Any) -> Any:
    """``cls`` from a shipped preset, then the keys of a YAML file, then command-line values (not None)."""
    from mneme_plugin.config import read_yaml_mapping
    from mneme_plugin.presets import merged_config

    data = merged_config(preset, read_yaml_mapping(config) if config else {})
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
