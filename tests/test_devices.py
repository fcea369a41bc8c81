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
