"""``mneme attribute``: writes the table and prints counts and a Delta histogram."""

from __future__ import annotations

from click.testing import CliRunner

from mneme_plugin.attribution import load_attribution
from mneme_plugin.cli import main
from tests.helpers import write_activation_store


def test_cli_attribute_writes_table_and_prints_counts(planted, planted_crosscoder, tmp_path):
    planted_crosscoder.save_pretrained(tmp_path / "cc")
    store = write_activation_store(tmp_path / "store", planted.x[:6000], rows_per_shard=2500, scale_factors=[1.0, 1.0])
    config = tmp_path / "attr.yaml"
    config.write_text("attribution:\n  delta_base_only: 0.95\n  device: cpu\n")
    out = tmp_path / "attr"
    res = CliRunner().invoke(main, ["attribute", "--crosscoder", str(tmp_path / "cc"), "--store", str(store),
                                    "--out", str(out), "--config", str(config), "--batch-size", "1000"])
    assert res.exit_code == 0, res.output
    assert "base_only" in res.output and "never fired" in res.output and "0.95-1.00 |" in res.output
    loaded = load_attribution(out)
    assert loaded.summary["config"]["delta_base_only"] == 0.95 and loaded.summary["config"]["batch_size"] == 1000
    assert loaded.summary["n_tokens"] == 6000

    bad = tmp_path / "bad.yaml"
    bad.write_text("attribution:\n  delta_base_onl: 0.9\n")
    res = CliRunner().invoke(main, ["attribute", "--crosscoder", str(tmp_path / "cc"), "--store", str(store),
                                    "--out", str(out), "--config", str(bad)])
    assert res.exit_code != 0 and "did you mean 'delta_base_only'" in res.output
