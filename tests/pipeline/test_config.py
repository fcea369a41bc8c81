"""The run directory's own config file (``pipeline.config``)."""
import yaml

from mneme_plugin.interpret.clients import REDACTED_KEY
from mneme_plugin.pipeline import RunConfig, load_run_config, save_run_config
from mneme_plugin.pipeline.stages import client_problems


def test_the_run_directory_config_holds_no_literal_api_key(tmp_path):
    """A run's config.yaml is shared with its results (copied, zipped, committed): a literal API key given
    in the user's config is written as REDACTED_KEY there, an ``env:NAME`` key as given. The run directory
    still loads, and a stage that would call the client from it asks for the key again."""
    (tmp_path / "c.txt").write_text("the cat sees the dog\n")
    client = {"kind": "openai", "model": "m", "base_url": "https://llm.example/v1"}
    config = RunConfig.from_dict({
        "run_dir": str(tmp_path / "run"), "models": {"base": "b", "edited": "e"},
        "corpus": {"source": str(tmp_path / "c.txt")}, "harvest": {"layer": 1},
        "explain": {"explainer": "default", "client": {**client, "api_key": "sk-literal-explain"}},
        "map": {"client": {**client, "api_key": "env:MNEME_TEST_MAP_KEY"}}})
    path = save_run_config(config)
    text = path.read_text()
    assert "sk-literal-explain" not in text
    saved = yaml.safe_load(text)
    assert saved["explain"]["client"]["api_key"] == REDACTED_KEY
    assert saved["map"]["client"]["api_key"] == "env:MNEME_TEST_MAP_KEY"
    assert config.explain.client.api_key == "sk-literal-explain"  # the config in memory keeps it

    loaded = load_run_config(tmp_path / "run")
    assert loaded.explain.client.api_key == REDACTED_KEY
    assert loaded.explain.client.model == "m" and loaded.map.client.api_key == "env:MNEME_TEST_MAP_KEY"
    problems = " ".join(" ".join(client_problems(loaded, ["explain"])).split())
    assert "explain.client: the API key of this config was given literally and so not written to its file" in problems
