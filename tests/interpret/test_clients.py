"""The OpenAI-compatible client against a local HTTP server: retries, timeout, disk cache, and
Delphi's DefaultExplainer end to end through it."""

from __future__ import annotations

import pytest

from mneme_plugin.interpret import (
    ClientConfig, ClientError, ExplainConfig, OpenAICompatibleClient, delphi_installed, explain,
)
from tests.helpers import FakeLLM


def test_delphi_is_installed_as_the_test_command_installs_it():
    # The Delphi tests below run unconditionally: without Delphi they fail rather than skip in silence.
    assert delphi_installed(), "install Delphi as README's test command does: pip install --no-deps eai-delphi==0.1.3"


@pytest.fixture
def fake_llm():
    server = FakeLLM()
    yield server
    server.close()


def client(fake_llm, tmp_path, **kw):
    opts = dict(base_url=fake_llm.url, api_key="k", max_retries=3, backoff_base=0.01, backoff_max=0.05,
                timeout=0.3, cache_dir=tmp_path / "cache")
    opts.update(kw)
    return OpenAICompatibleClient("fake-model", **opts)


def test_retries_on_429_500_and_timeout_then_caches(fake_llm, tmp_path):
    fake_llm.script = [429, 500, "stall"]
    c = client(fake_llm, tmp_path)
    out = c.generate_sync([{"role": "user", "content": "[EXPLANATION]: <<x>>"}], temperature=0.0)
    assert out.text.startswith("[EXPLANATION]:")
    assert len(fake_llm.requests) == 4 and c.n_requests == 4
    assert fake_llm.requests[-1]["model"] == "fake-model" and fake_llm.requests[-1]["temperature"] == 0.0
    again = client(fake_llm, tmp_path).generate_sync([{"role": "user", "content": "[EXPLANATION]: <<x>>"}], temperature=0.0)
    assert again.text == out.text and len(fake_llm.requests) == 4  # served from the disk cache


def test_the_cache_keys_answers_by_endpoint(fake_llm, tmp_path):
    """One model name served by two servers (`vllm serve --served-model-name`) may be two models: an
    answer cached from one is not the other's."""
    other = FakeLLM()
    try:
        other.reply = lambda body: {"message": {"role": "assistant", "content": "another model"}}
        prompt = [{"role": "user", "content": "[EXPLANATION]: <<x>>"}]
        first = client(fake_llm, tmp_path).generate_sync(prompt, temperature=0.0)
        second = OpenAICompatibleClient("fake-model", base_url=other.url, cache_dir=tmp_path / "cache").generate_sync(
            prompt, temperature=0.0)
        assert (first.text, second.text) == ("[EXPLANATION]: mentions of gene and dna", "another model")
        assert len(fake_llm.requests) == len(other.requests) == 1
        assert client(fake_llm, tmp_path).generate_sync(prompt, temperature=0.0).text == first.text
        assert len(fake_llm.requests) == 1  # each server's answer is cached under its own key
    finally:
        other.close()


def test_gives_up_after_retries_and_does_not_retry_400(fake_llm, tmp_path):
    fake_llm.script = [500, 500, 500]
    with pytest.raises(ClientError, match="after 3 attempts"):
        client(fake_llm, tmp_path, max_retries=2, cache_dir=None).generate_sync("hi")
    fake_llm.script = [400]
    n = len(fake_llm.requests)
    with pytest.raises(ClientError, match="not retried"):
        client(fake_llm, tmp_path, cache_dir=None).generate_sync("hi")
    assert len(fake_llm.requests) == n + 1


def test_a_200_whose_body_is_no_chat_completion_is_retried_then_named(fake_llm, tmp_path):
    """A proxy's error page sent with status 200 failed the request at once ("Unexpected chat-completions
    answer"), ending a stage of thousands of calls on one transient glitch. It is retried like a 5xx;
    if every attempt gets one, the error names it and the endpoint to check."""
    fake_llm.script = ["malformed", "malformed"]
    out = client(fake_llm, tmp_path, cache_dir=None).generate_sync("[EXPLANATION]: <<x>>")
    assert out.text.startswith("[EXPLANATION]:") and len(fake_llm.requests) == 3
    fake_llm.script = ["malformed"] * 3
    with pytest.raises(ClientError) as failed:
        client(fake_llm, tmp_path, max_retries=2, cache_dir=None).generate_sync("hi")
    message = str(failed.value)
    assert "after 3 attempts" in message and "HTTP 200 with an answer that is no chat completion" in message
    assert "502 Bad Gateway" in message and "OpenAI-compatible /v1 endpoint" in message
    assert len(fake_llm.requests) == 6


def test_delphi_default_explainer_through_our_client(collected, fake_llm, tmp_path, tiny_tokenizer):
    out, cfg, result = collected
    fake_llm.script = [429]
    ccfg = ClientConfig(kind="openai", model="fake-model", base_url=fake_llm.url, api_key=None,
                        backoff_base=0.01, timeout=5.0, cache_dir=str(tmp_path / "cache"))
    ecfg = ExplainConfig(explainer="default", client=ccfg, n_examples=4, min_examples=1, scorers=["detection"])
    table = explain(out, ecfg, out_dir=tmp_path, tokenizer=tiny_tokenizer)
    fired = [p["latent"] for p in result.per_latent if p["top_rows"]]
    assert list(table["latent"]) == sorted(fired)
    assert (table["explanation"] == "mentions of gene and dna").all()
    assert table["explainer"].eq("default").all()
    assert table["detection"].between(0, 1).all()  # scored by Delphi's DetectionScorer through our client
    n = len(fake_llm.requests)
    # A rerun sends the same prompts, the scorers' too (their shuffles are seeded per latent): all hit the cache.
    again = explain(out, ecfg, out_dir=tmp_path, tokenizer=tiny_tokenizer)
    assert len(fake_llm.requests) == n
    assert list(again["explanation"]) == list(table["explanation"])
    assert list(again["detection"]) == list(table["detection"])


def test_delphi_imports_without_vllm_and_leaves_no_stub():
    import importlib.util
    import sys

    from mneme_plugin.interpret import DelphiUnavailableError, import_delphi
    from mneme_plugin.interpret.delphi_compat import vllm_installed

    explainers = import_delphi("delphi.explainers")
    assert hasattr(explainers, "DefaultExplainer")
    if vllm_installed():
        pytest.skip("vllm is installed: nothing is stubbed")
    assert "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None
    from delphi.clients import Offline

    with pytest.raises(DelphiUnavailableError, match="vLLM is not installed"):
        Offline("some/model")


def test_llm_explain_and_map_show_progress(collected, fake_llm, tmp_path, tiny_tokenizer, capsys):
    """One LLM call per latent (and per taxonomy), for hours on a real run: each stage shows a bar."""
    from mneme_plugin.interpret import MapConfig, map_descriptions

    out, cfg, result = collected
    ccfg = ClientConfig(kind="openai", model="fake-model", base_url=fake_llm.url, api_key=None, timeout=5.0)
    table = explain(out, ExplainConfig(explainer="default", client=ccfg, n_examples=4, min_examples=1),
                    out_dir=tmp_path, tokenizer=tiny_tokenizer)
    n = len(table)
    assert n > 1 and "explain: 100%" in capsys.readouterr().err.replace("\r", "\n")
    map_descriptions(table, MapConfig(taxonomies=["organism"], method="llm", labeler="llm", client=ccfg))
    err = capsys.readouterr().err.replace("\r", "\n")
    assert f"{n}/{n}" in err and "label" in err and "map (organism)" in err
    explain(out, ExplainConfig(explainer="default", client=ccfg, n_examples=4, min_examples=1),
            out_dir=tmp_path, tokenizer=tiny_tokenizer, progress=False)
    assert "explain" not in capsys.readouterr().err


def test_identical_prompts_in_flight_share_one_request(fake_llm, tmp_path):
    """Identical prompts sent together all miss the cache (none is answered yet): the first asks, the
    others share its answer, so N identical prompts at concurrency 4 cost one request; also without a
    cache at temperature 0; sampled answers without a cache stay separate draws."""
    import asyncio

    prompt = [{"role": "user", "content": "[EXPLANATION]: <<x>>"}]

    def ask(c, n, **kw):
        async def go():
            return await asyncio.gather(*(c.generate(prompt, **kw) for _ in range(n)))
        return asyncio.run(go())

    answers = ask(client(fake_llm, tmp_path, concurrency=4), 20, temperature=0.0)
    assert len(fake_llm.requests) == 1 and {a.text for a in answers} == {"[EXPLANATION]: mentions of gene and dna"}
    assert len(ask(client(fake_llm, tmp_path, concurrency=4, cache_dir=None), 9, temperature=0)) == 9
    assert len(fake_llm.requests) == 2
    ask(client(fake_llm, tmp_path, concurrency=4, cache_dir=None), 3, temperature=1.0)
    assert len(fake_llm.requests) == 5
    # a refusal reaches every caller that shared the request, and the next call asks again
    fake_llm.script = [400]
    c = client(fake_llm, tmp_path, concurrency=4, cache_dir=None)

    async def refused():
        return await asyncio.gather(*(c.generate(prompt, temperature=0) for _ in range(5)), return_exceptions=True)

    errors = asyncio.run(refused())
    assert len(fake_llm.requests) == 6 and all(isinstance(e, ClientError) for e in errors)
    assert c.generate_sync(prompt, temperature=0).text and len(fake_llm.requests) == 7


def test_a_redacted_key_is_refused_before_any_call(fake_llm, tmp_path):
    """A config file holds REDACTED_KEY where a literal key was given: using it asks for the key again."""
    from mneme_plugin.errors import ConfigError
    from mneme_plugin.interpret.clients import REDACTED_KEY, make_client, redact_api_key, resolve_api_key

    assert [redact_api_key(k) for k in ("sk-secret", "env:MY_KEY", None, REDACTED_KEY)] == [
        REDACTED_KEY, "env:MY_KEY", None, REDACTED_KEY]
    with pytest.raises(ConfigError, match="given literally and so not written"):
        resolve_api_key(REDACTED_KEY)
    with pytest.raises(ConfigError, match="client: the API key of this config was given literally"):
        make_client(ClientConfig(kind="openai", model="m", base_url=fake_llm.url, api_key=REDACTED_KEY))
    assert not fake_llm.requests


def test_a_timeout_names_the_setting_and_a_cut_answer_is_counted(fake_llm, tmp_path, caplog):
    """A timed-out endpoint's error names client.timeout (it read `ReadTimeout: ` alone); an answer the
    endpoint stopped at max_tokens (finish_reason length) is counted and logged once."""
    fake_llm.script = ["stall", "stall"]
    with pytest.raises(ClientError, match=r"no answer within client.timeout = 0.3 s"):
        client(fake_llm, tmp_path, max_retries=1, cache_dir=None).generate_sync("hi")
    fake_llm.reply = lambda body: {"message": {"role": "assistant", "content": "[EXPLANATION]: the"},
                                   "finish_reason": "length"}
    c = client(fake_llm, tmp_path, cache_dir=None, max_tokens=4)
    with caplog.at_level("WARNING", logger="mneme_plugin"):
        c.generate_sync("one")
        c.generate_sync("two")
    assert c.n_truncated == 2
    assert caplog.text.count("at max_tokens (4; finish_reason length)") == 1
