"""Imported crosscoders go through attribution like trained ones (saved in our format, loaded by path)."""

import pytest
import torch

from mneme_plugin.formats import import_crosscoder, load_crosscoder
from tests.formats.test_import_published import _median_threshold
from tests.helpers import kissane_state_dict, sof_state_dict, write_kissane_crosscoder, write_sof_crosscoder

from mneme_plugin import attribution
from mneme_plugin.errors import ConfigError


@pytest.mark.parametrize("kind", ["sof-SAE", "kissane"])
def test_attribution_runs_on_imported_crosscoders(tmp_path, kind):
    x = 2.0 * torch.randn(400, 2, 16, generator=torch.Generator().manual_seed(0))
    if kind == "kissane":
        src = write_kissane_crosscoder(tmp_path / "src", kissane_state_dict())
        out = import_crosscoder(src, tmp_path / "cc", scale_factors=[1.0, 1.0])
    else:
        code_norm = kind.split("-")[1]
        sd = sof_state_dict(code_normalization=code_norm, seed=1)
        sd["threshold"] = torch.tensor(_median_threshold(sd, code_norm, x), dtype=torch.float32)
        out = import_crosscoder(write_sof_crosscoder(tmp_path / "src", sd, "hub", code_normalization=code_norm),
                                tmp_path / "cc")
    result = attribution.attribute(out, x, {"batch_size": 128, "device": "cpu"}, progress=False)
    table = result.table
    assert len(table) == load_crosscoder(out).dict_size
    assert (table["fire_count"] > 0).any()


def test_attribution_refuses_decoupled_crosscoders_clearly(tmp_path):
    x = 2.0 * torch.randn(200, 2, 16, generator=torch.Generator().manual_seed(0))
    sd = sof_state_dict(code_normalization="DECOUPLED", seed=1)
    out = import_crosscoder(write_sof_crosscoder(tmp_path / "src", sd, "hub", code_normalization="DECOUPLED"),
                            tmp_path / "cc")
    with pytest.raises(ConfigError, match="DECOUPLED"):
        attribution.attribute(out, x, {"batch_size": 128, "device": "cpu"}, progress=False)
