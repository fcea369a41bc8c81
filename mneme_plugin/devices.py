"""Device names in configs: ``auto`` means CUDA when available, else CPU.

Any other name is checked here, once, so that a device this machine lacks is a clear error
before a model is loaded rather than a torch traceback in the middle of a stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mneme_plugin.errors import ConfigError

if TYPE_CHECKING:
    import torch


# torch's device types a config may name (with ``:N`` for an index), besides "auto".
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "xla", "hpu", "npu", "mtia", "meta")


def device_name_problem(device: object, key: str = "device") -> str | None:
    """What is wrong with ``device`` as a device name in a config (None if nothing), told without torch, so
    that a config check (the dry run) refuses a misspelt device before any stage runs; whether this
    machine has it is ``resolve_device``'s to say, when a stage starts."""
    if isinstance(device, str):
        kind, _, index = device.partition(":")
        if device == "auto" or (kind in DEVICE_TYPES and (not _ or index.isdigit())):
            return None
    return f"{key} must be auto, cpu, cuda, cuda:N or mps (or another torch device type: {', '.join(DEVICE_TYPES[3:])}), got {device!r}."


def check_device_name(device: object, key: str = "device") -> None:
    """ConfigError when ``device_name_problem`` finds one (configs' ``__post_init__``)."""
    problem = device_name_problem(device, key)
    if problem:
        raise ConfigError(problem)


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``device`` ("auto", "cpu", "cuda", "cuda:1", "mps"); ConfigError if unusable here."""
    import torch  # here: configs name devices in modules that must import without torch (`mneme info`)

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps.") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"Device {device!r} asked for, but CUDA is not available on this machine (no GPU, driver or CUDA "
                "build of torch): set that device to cpu (--device, --train-device or the config's device field), or to auto "
                "to take a GPU only when there is one."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"Device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
    elif resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"Device {device!r} asked for, but MPS is not available on this machine: use cpu.")
    return resolved
