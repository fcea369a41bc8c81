import json

import torch
from click.testing import CliRunner

from mneme_plugin.cli import main
from mneme_plugin.formats import load_crosscoder
from tests.helpers import kissane_state_dict, sof_state_dict, write_kissane_crosscoder, write_sof_crosscoder


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_import_then_export_from_the_command_line(tmp_path):
    sd = sof_state_dict(seed=2, threshold=0.05)
    src = write_sof_crosscoder(tmp_path / "sof", sd, "hub", code_normalization="SAE")
    result = _run("import", src, "--out", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    assert "science-of-finetuning" in result.output and "mean_scale" in result.output
    x = torch.randn(8, 2, 16)
    assert torch.equal(load_crosscoder(tmp_path / "ours")(x), load_crosscoder(src)(x))

    result = _run("export", "saelens", tmp_path / "ours", "--out", tmp_path / "sl", "--hook", "blocks.13.hook_resid_post",
                  "--views")
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "sl" / "blocks.13.hook_resid_post" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "google/gemma-2-2b"
    assert (tmp_path / "sl" / "blocks.13.hook_resid_post__edited" / "sae_weights.safetensors").is_file()
    # The export's folder holds the joint crosscoder and its two per-model views: importing the folder takes the
    # joint one (it said "holds several crosscoders ... give __edited", which it then refused as a view).
    result = _run("import", tmp_path / "sl", "--out", tmp_path / "back")
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(load_crosscoder(tmp_path / "back")(x), load_crosscoder(src)(x), rtol=1e-5, atol=1e-4)


def test_cli_errors_are_one_line(tmp_path):
    folder = write_kissane_crosscoder(tmp_path / "k", kissane_state_dict())
    result = CliRunner().invoke(main, ["import", str(folder), "--out", str(tmp_path / "o"), "--scale-factors", "1"])
    assert result.exit_code != 0 and "--scale-factors must be two numbers" in result.output
    (tmp_path / "junk").mkdir()
    result = CliRunner().invoke(main, ["import", str(tmp_path / "junk"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "is not a crosscoder this package can read" in result.output
    assert "Traceback" not in result.output


def test_import_and_export_refuse_to_overwrite_without_force(tmp_path):
    """Issue 11 item 8: an existing config.json / cfg.json is never silently replaced."""
    first = write_sof_crosscoder(tmp_path / "a", sof_state_dict(seed=2, threshold=0.05), "hub")
    second = write_kissane_crosscoder(tmp_path / "b", kissane_state_dict(seed=3))
    assert _run("import", first, "--out", tmp_path / "ours").exit_code == 0
    before = (tmp_path / "ours" / "config.json").read_bytes()
    result = CliRunner().invoke(main, ["import", str(second), "--out", str(tmp_path / "ours")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{tmp_path / 'ours' / 'config.json'}" in result.output and "--force" in result.output
    assert (tmp_path / "ours" / "config.json").read_bytes() == before
    assert _run("import", second, "--out", tmp_path / "ours", "--force").exit_code == 0
    x = torch.randn(4, 2, 16)
    assert torch.equal(load_crosscoder(tmp_path / "ours")(x), load_crosscoder(second)(x))

    assert _run("export", "saelens", tmp_path / "ours", "--out", tmp_path / "sl", "--folder", "f").exit_code == 0
    cfg_before = (tmp_path / "sl" / "f" / "cfg.json").read_bytes()
    result = CliRunner().invoke(main, ["export", "saelens", str(first), "--out", str(tmp_path / "sl"), "--folder", "f"])
    assert result.exit_code != 0 and "cfg.json" in result.output and "refusing to overwrite" in result.output
    assert (tmp_path / "sl" / "f" / "cfg.json").read_bytes() == cfg_before
    assert _run("export", "saelens", first, "--out", tmp_path / "sl", "--folder", "f", "--force").exit_code == 0
    assert (tmp_path / "sl" / "f" / "cfg.json").read_bytes() != cfg_before


def test_a_kissane_cfg_with_a_non_text_hook_point_exports_without_a_traceback(tmp_path):
    """cfg.json's hook_point became the crosscoder's hook_name whatever its type: a number made `mneme export
    saelens` fail with a raw TypeError (the folder is named by the hook)."""
    import pytest
    import sae_lens

    from mneme_plugin.errors import ConfigError
    from mneme_plugin.formats import export_saelens

    folder = write_kissane_crosscoder(tmp_path / "k", kissane_state_dict())
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["hook_point"] = 14
    (folder / "cfg.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(main, ["export", "saelens", str(folder), "--out", str(tmp_path / "out"), "--hook",
                                       "blocks.14.hook_resid_pre"])
    assert result.exit_code == 0, (result.output, result.exception)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "out" / "blocks.14.hook_resid_pre"))
    assert sae.cfg.metadata.hook_name == "blocks.14.hook_resid_pre"
    result = CliRunner().invoke(main, ["export", "saelens", str(folder), "--out", str(tmp_path / "out2")])
    assert result.exit_code == 0 and (tmp_path / "out2" / "crosscoder" / "cfg.json").is_file(), result.output
    cc = load_crosscoder(folder)
    cc.cfg.metadata["hook_name"] = 14  # recorded by another source
    with pytest.raises(ConfigError, match="records hook_name 14, not a hook point name"):
        export_saelens(cc, tmp_path / "out3")
