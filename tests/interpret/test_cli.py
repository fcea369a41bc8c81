"""`mneme collect / explain / map` on tiny local models."""

from __future__ import annotations

import pandas as pd
from click.testing import CliRunner

from mneme_plugin.cli import main


def test_collect_explain_map_cli(tmp_path, llama_dir, thresholded_crosscoder):
    cc_dir = tmp_path / "cc"
    thresholded_crosscoder.save_pretrained(cc_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the cat sees the house today", "a dog likes the road at night"] * 20))
    out = tmp_path / "ctx"
    runner = CliRunner()
    r = runner.invoke(main, ["collect", "--crosscoder", str(cc_dir), "--base", str(llama_dir), "--edited",
                             str(llama_dir), "--corpus", str(corpus), "--layer", "1", "--latents", "0,1,2,3",
                             "--n-top", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["explain", str(out), "--explainer", "offline"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["map", str(out), "--taxonomy", "mmlu", "--taxonomy", "organism", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out / "categories.csv")
    assert set(table["taxonomy"]) <= {"mmlu", "organism"}
    # A latent whose description matches no entry reads "(no match)", not "nan"; a count per taxonomy follows.
    assert table["category"].isna().any() and "nan" not in r.output and "(no match)" in r.output
    counts = {name: f"{rows['category'].notna().sum()} of {len(rows)}" for name, rows in table.groupby("taxonomy")}
    assert f"Latents matched to a category: mmlu: {counts['mmlu']}; organism: {counts['organism']}" in r.output
    r = runner.invoke(main, ["explain", str(out), "--explainer", "default"])
    assert r.exit_code != 0 and "needs an LLM client" in r.output
    # The stub cannot map: --client does not offer it, and a config that names it is refused.
    r = runner.invoke(main, ["map", str(out), "--taxonomy", "mmlu", "--method", "llm", "--client", "stub"])
    assert r.exit_code != 0 and "'stub' is not one of" in r.output
    stub = tmp_path / "stub_map.yaml"
    stub.write_text("map: {method: llm, client: {kind: stub}}\n")
    r = runner.invoke(main, ["map", str(out), "--taxonomy", "mmlu", "--config", str(stub)])
    assert r.exit_code != 0 and "client.kind 'stub' cannot label or rank categories" in r.output
    # Delphi's explainer parses the offline stub's answer (a smoke run of that path; .ci/run installs Delphi).
    r = runner.invoke(main, ["explain", str(out), "--explainer", "default", "--client", "stub",
                             "--out", str(tmp_path / "stub")])
    assert r.exit_code == 0, r.output
    explained = pd.read_csv(tmp_path / "stub" / "explanations.csv")
    assert len(explained) > 0 and explained["explanation"].str.startswith("stub explanation ").all()


def test_explain_names_a_tokenizer_it_cannot_load(tmp_path, collected):
    """`mneme explain --tokenizer` with a folder that does not exist or holds no tokenizer, or a contexts folder
    whose saved tokenizer is broken, ended in transformers' traceback (a repo-id validation error for a path)."""
    import shutil

    out, _, _ = collected
    contexts = tmp_path / "ctx"
    shutil.copytree(out, contexts)
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    for tokenizer, says in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "could not be loaded as a "
                                                                        "tokenizer")):
        r = runner.invoke(main, ["explain", str(contexts), "--tokenizer", str(tokenizer)])
        assert r.exit_code == 1 and r.exception is not None and isinstance(r.exception, SystemExit), r.output
        assert f"Error: {tokenizer}" in r.output or f"Error: The tokenizer folder {tokenizer}" in r.output
        assert says in r.output
    saved = contexts / "tokenizer"
    for child in saved.iterdir():
        child.unlink()
    r = runner.invoke(main, ["explain", str(contexts)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "could not be loaded as a tokenizer" in r.output and "collect again" in r.output
    assert runner.invoke(main, ["explain", str(contexts), "--tokenizer", str(out / "tokenizer")]).exit_code == 0
