"""resolve_device: a device this machine lacks is a ConfigError before any work (issue 11 item 6)."""

import pytest
import torch

from mneme_plugin.devices import resolve_device
from mneme_plugin.errors import ConfigError


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_config_error(name):
    with pytest.raises(ConfigError, match=rf"Device '{name}' asked for, but CUDA is not available.*set that device to cpu \(--device, --train-device"):
        resolve_device(name)


def test_a_cuda_index_beyond_the_devices_is_a_config_error():
    name = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=rf"Device '{name}' asked for"):
        resolve_device(name)


def test_an_unknown_device_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"Unknown device 'gpu0': use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")


def test_device_names_are_checked_without_torch():
    """Configs check the spelling of a device (the dry run refuses `tpu` before any stage); whether this
    machine has it stays resolve_device's to say."""
    import subprocess
    import sys

    from mneme_plugin.devices import device_name_problem

    for good in ("auto", "cpu", "cuda", "cuda:3", "mps", "xpu:0"):
        assert device_name_problem(good) is None, good
    for bad in ("tpu", "cuda:", "cuda:x", "CPU", "", None, 0):
        assert "must be auto, cpu, cuda, cuda:N or mps" in str(device_name_problem(bad, "training.device")), bad
    code = ("import sys; from mneme_plugin.attribution.config import AttributionConfig; AttributionConfig(device='cuda:1'); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
