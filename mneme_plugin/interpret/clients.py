"""LLM clients for explaining and labelling latents.

A client is anything with ``async generate(prompt, **kwargs) -> Response`` where ``prompt`` is a
string or a list of chat messages ``{"role", "content"}``: the interface of Delphi's ``Client``.
Ours does not need Delphi; :func:`as_delphi_client` adapts any of ours into a real
``delphi.clients.Client`` subclass (returning Delphi's ``Response``), so Delphi's explainers and
scorers accept it.

* :class:`OpenAICompatibleClient`: any ``/v1/chat/completions`` endpoint (``vllm serve``, a hosted
  API). Concurrency limit, retries with exponential backoff (429, 5xx, timeouts, connection
  errors; ``Retry-After`` honoured), a request timeout, and an on-disk cache keyed by a hash of
  (endpoint, model, messages, generation parameters) so a re-run pays nothing twice; identical requests
  in flight at once (cached or at temperature 0) are sent once and share its answer.
* :class:`VLLMOfflineClient`: Delphi's in-process vLLM client (``delphi.clients.Offline``) for a
  local model on a GPU; needs vllm and Delphi.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from mneme_plugin.errors import ConfigError, MnemeError
from mneme_plugin.files import atomic_write_text

logger = logging.getLogger("mneme_plugin")

Prompt = Union[str, list[dict[str, str]]]
_PASSED_KWARGS = ("temperature", "max_tokens", "top_p", "logprobs", "top_logprobs", "stop", "seed")
# The folder of a stage's LLM answers (a DiskCache) inside the folder it is given for its caches.
LLM_CACHE_DIR = "llm_cache"


class ClientError(MnemeError, RuntimeError):
    """The LLM endpoint failed (after retries) or answered something unusable."""


@dataclass
class Response:
    """Mirrors ``delphi.clients.client.Response``."""

    text: str
    logprobs: list[float] | None = None
    prompt_logprobs: list[float] | None = None
    # Per generated token, the endpoint's top alternatives {token: logprob} (``top_logprobs`` requests).
    top_logprobs: list[dict[str, float]] | None = None


class Client(ABC):
    """Mirrors Delphi's ``Client``: ``async generate(prompt, **kwargs) -> Response``."""

    def __init__(self, model: str) -> None:
        self.model = model

    @abstractmethod
    async def generate(self, prompt: Prompt, **kwargs: Any) -> Response:
        """Generate a completion of ``prompt`` (a string or chat messages)."""

    def generate_sync(self, prompt: Prompt, **kwargs: Any) -> Response:
        return asyncio.run(self.generate(prompt, **kwargs))


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


class DiskCache:
    """JSON files under ``folder`` keyed by sha256 of (endpoint, model, messages, generation parameters)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0

    @staticmethod
    def key(model: str, messages: list[dict[str, str]], params: dict[str, Any], endpoint: str | None = None) -> str:
        """``endpoint``: the server's URL, as a model name alone does not say which model answers (two
        servers can serve different weights under one name: ``vllm serve --served-model-name``)."""
        parts: dict[str, Any] = {"model": model, "messages": messages, "params": params}
        if endpoint is not None:
            parts["endpoint"] = endpoint
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Response | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        self.hits += 1
        return Response(data["text"], data.get("logprobs"), data.get("prompt_logprobs"), data.get("top_logprobs"))

    def discard(self, key: str) -> bool:
        """Remove the answer under ``key``; whether there was one."""
        path = self._path(key)
        found = path.is_file()
        path.unlink(missing_ok=True)
        return found

    def put(self, key: str, response: Response) -> None:
        atomic_write_text(self._path(key), json.dumps({"text": response.text, "logprobs": response.logprobs,
                                                       "prompt_logprobs": response.prompt_logprobs,
                                                       "top_logprobs": response.top_logprobs}))


class StubClient(Client):
    """An offline stand-in for a judge or explainer, for smoke runs without any LLM: its answer is a
    hash of the prompt (a number 0-100 with its log-probability when asked for ``top_logprobs``,
    else ``#thescore: N`` with N in 1..5 followed by a Delphi ``[EXPLANATION]:`` line, so both the
    judge and Delphi's explainers parse it). It proves that the plumbing works, never anything about a model."""

    async def generate(self, prompt: Prompt, **kwargs: Any) -> Response:
        digest = int(hashlib.sha256(json.dumps(as_messages(prompt)).encode()).hexdigest(), 16)
        if kwargs.get("top_logprobs"):
            number = str(digest % 101)
            return Response(number, top_logprobs=[{number: 0.0}])
        # Delphi's explainers read everything after "[EXPLANATION]:", so that line comes last.
        return Response(f"#thereason: stub judge.\n#thescore: {1 + digest % 5}\n"
                        f"[EXPLANATION]: stub explanation {digest % 1000}")


async def gather_with_progress(awaitables: list[Any], desc: str, progress: bool = True) -> list[Any]:
    """``asyncio.gather`` of one awaitable per latent (results in order) with a progress bar that moves
    as each finishes: a stage of LLM calls per latent runs for hours on a real model."""
    from tqdm.auto import tqdm

    tasks = [asyncio.ensure_future(a) for a in awaitables]
    with tqdm(total=len(tasks), desc=desc, unit="latent", disable=not progress) as bar:
        for task in tasks:
            task.add_done_callback(lambda _: bar.update(1))
        return list(await asyncio.gather(*tasks))


# What a config file holds instead of a literal API key (``redact_api_key``): a key is a secret, and a config
# file is copied, shared and committed. A config that holds it is refused before its client is used
# (``missing_key_problem``), so a rerun from the file asks for the key instead of calling without one.
REDACTED_KEY = "<redacted>"


def redact_api_key(value: str | None) -> str | None:
    """``value`` as a config file may hold it: ``env:NAME`` and None as they are (they hold no secret), a
    literal key replaced by ``REDACTED_KEY``."""
    if value is None or value.startswith("env:") or value == REDACTED_KEY:
        return value
    return REDACTED_KEY


def resolve_api_key(value: str | None) -> str | None:
    """``env:NAME`` reads the environment variable NAME (None if unset); other values are literal;
    ``REDACTED_KEY`` (a key left out of a written config) is refused."""
    if value == REDACTED_KEY:
        raise ConfigError(_redacted_message("api_key"))
    if value and value.startswith("env:"):
        return os.environ.get(value[4:]) or None
    return value


def redacted_keys(value: Any) -> Any:
    """``value`` (a config's dict, nested) with every ``api_key`` as ``redact_api_key`` writes it, for what
    is shared (the report)."""
    if isinstance(value, dict):
        return {k: (redact_api_key(v) if k == "api_key" and isinstance(v, str) else redacted_keys(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redacted_keys(v) for v in value]
    return value


def _redacted_message(where: str) -> str:
    return (f"{where}: the API key of this config was given literally and so not written to its file ({REDACTED_KEY}); "
            "give it again, preferably as env:NAME (an environment variable holding it), or null for an endpoint "
            "that needs none.")


def missing_key_problem(base_url: str, api_key: str | None, where: str) -> str | None:
    """What is wrong when ``api_key`` reads its key from an environment variable that is not set and the
    endpoint is served over https (a hosted API: every call would be refused, after retries, once the work
    before it is done), or is a key left out of a written config (``REDACTED_KEY``, any endpoint); None
    otherwise. A plain-http endpoint (``vllm serve`` on the cluster) may need no key, and ``api_key: null``
    says so for an https one."""
    if api_key == REDACTED_KEY:
        return _redacted_message(where)
    if not (api_key and api_key.startswith("env:")) or not base_url.lower().startswith("https://"):
        return None
    name = api_key[4:]
    if os.environ.get(name):
        return None
    return (f"{where}: {base_url} needs an API key; its api_key ({api_key}) reads the environment variable {name}, "
            f"which is not set: export {name}=... before running (or set api_key to another env:NAME, or to null "
            "for an endpoint that needs none).")


class OpenAICompatibleClient(Client):
    """A chat-completions client for any OpenAI-compatible endpoint (see module docstring)."""

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(self, model: str, base_url: str = "http://127.0.0.1:8000/v1", api_key: str | None = None,
                 concurrency: int = 8, max_retries: int = 5, backoff_base: float = 1.0, backoff_max: float = 30.0,
                 timeout: float = 120.0, max_tokens: int = 512, cache_dir: str | os.PathLike[str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(model)
        if not model:
            raise ConfigError("The OpenAI-compatible client needs a model name (client.model).")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff_base, self.backoff_max, self.timeout = backoff_base, backoff_max, timeout
        self.max_tokens = max_tokens
        self.extra = dict(extra or {})
        self.cache = DiskCache(cache_dir) if cache_dir else None
        self.n_requests = 0
        self.n_truncated = 0  # answers the endpoint stopped at max_tokens (finish_reason "length")
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        # Per event loop: the answer of each request in flight by its cache key, which identical calls await.
        self._in_flight: dict[int, dict[str, asyncio.Future[Response]]] = {}

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()  # one per event loop (Delphi runs its own loops)
        sem = self._semaphores.get(id(loop))
        if sem is None:
            sem = self._semaphores[id(loop)] = asyncio.Semaphore(self.concurrency)
        return sem

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.backoff_max, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.backoff_max, self.backoff_base * 2**attempt) * (0.5 + random.random() / 2)

    def _shares(self, params: dict[str, Any]) -> bool:
        """Whether identical requests in flight are asked once: when their answer is cached (the cache keeps
        one answer per key anyway) or asked for at temperature 0; sampled answers without a cache are
        separate draws."""
        return self.cache is not None or params.get("temperature") == 0

    def _prepare(self, prompt: Prompt, kwargs: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any], str]:
        """The messages, generation parameters and key (the cache's, and the in-flight requests') of a request."""
        messages = as_messages(prompt)
        params = {"max_tokens": self.max_tokens, **self.extra,
                  **{k: v for k, v in kwargs.items() if k in _PASSED_KWARGS and v is not None}}
        return messages, params, DiskCache.key(self.model, messages, params, endpoint=self.base_url)

    def forget(self, prompt: Prompt, **kwargs: Any) -> bool:
        """Drop the cached answer to ``generate(prompt, **kwargs)``, so that the next call asks the endpoint
        again (an answer the caller could not use); whether one was cached."""
        key = self._prepare(prompt, kwargs)[2]
        return bool(self.cache and self.cache.discard(key))

    async def generate(self, prompt: Prompt, **kwargs: Any) -> Response:
        messages, params, key = self._prepare(prompt, kwargs)
        if self.cache and (hit := self.cache.get(key)) is not None:
            return hit
        if not self._shares(params):
            return await self._request(key, messages, params)
        # Identical prompts (a stage that asks the same question for many latents) arrive together, each
        # before any is answered, so the cache above misses for all: the first asks, the others wait for
        # its answer instead of each paying for the same request.
        loop = asyncio.get_running_loop()
        in_flight = self._in_flight.setdefault(id(loop), {})
        while (shared := in_flight.get(key)) is not None:
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not shared.cancelled() or (task is not None and task.cancelling()):
                    raise  # this call was cancelled; else the one that asked was, and this one asks itself
        future: asyncio.Future[Response] = loop.create_future()
        in_flight[key] = future
        try:
            response = await self._request(key, messages, params)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # read here: no waiter is no "exception never retrieved" warning
            raise
        else:
            future.set_result(response)
            return response
        finally:
            in_flight.pop(key, None)

    async def _request(self, key: str, messages: list[dict[str, str]], params: dict[str, Any]) -> Response:
        import httpx

        body = {"model": self.model, "messages": messages, **params}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        last = "no attempt"
        async with self._semaphore():
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                for attempt in range(self.max_retries + 1):
                    retry_after = None
                    try:
                        self.n_requests += 1
                        resp = await http.post(url, json=body, headers=headers)
                    except httpx.TimeoutException as err:
                        last = (f"{type(err).__name__} {err}".strip() + f" (no answer within client.timeout = "
                                f"{self.timeout:g} s; raise it for a slow endpoint or long answers)")
                    except httpx.TransportError as err:
                        last = f"{type(err).__name__}: {err}"
                    else:
                        if resp.status_code == 200:
                            try:
                                response, finish_reason = self._parse(resp)
                            except ClientError as err:
                                # A 200 whose body is no chat completion (a proxy's error page, a body cut
                                # short) is most often transient: retried like a 5xx, named if it persists.
                                last = (f"HTTP 200 with {err} Check that base_url ({self.base_url}) is an "
                                        "OpenAI-compatible /v1 endpoint.")
                            else:
                                if finish_reason == "length":
                                    self._note_truncated()
                                if self.cache:
                                    self.cache.put(key, response)
                                return response
                        else:
                            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                            if resp.status_code not in self.RETRY_STATUS:
                                raise ClientError(f"{url} refused the request ({last}); not retried.")
                            retry_after = resp.headers.get("retry-after")
                    if attempt < self.max_retries:
                        delay = self._delay(attempt, retry_after)
                        logger.debug("LLM request failed (%s); retry %d in %.2fs", last, attempt + 1, delay)
                        await asyncio.sleep(delay)
        raise ClientError(f"{url} failed after {self.max_retries + 1} attempts; last error: {last}")

    def _note_truncated(self) -> None:
        """Count an answer cut at max_tokens; the first one is logged (an explanation or a ranking cut short
        may parse as a shorter one, or not at all)."""
        self.n_truncated += 1
        if self.n_truncated == 1:
            logger.warning("%s stopped an answer of %s at max_tokens (%d; finish_reason length): answers cut short "
                           "may parse as shorter ones or not at all; raise client.max_tokens if this recurs.",
                           self.base_url, self.model, self.max_tokens)

    @staticmethod
    def _parse(resp: Any) -> tuple[Response, str | None]:
        """The answer of a chat-completions response, and its choice's finish reason."""
        try:
            data = resp.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ClientError(f"an answer that is no chat completion: {resp.text[:200]!r} ({err!r}).") from err
        logprobs = top = None
        if isinstance(choice.get("logprobs"), dict) and choice["logprobs"].get("content"):
            content = choice["logprobs"]["content"]
            logprobs = [t.get("logprob") for t in content]
            if any(t.get("top_logprobs") for t in content):
                top = [{alt["token"]: alt["logprob"] for alt in t.get("top_logprobs") or []} for t in content]
        return Response(text=text, logprobs=logprobs, top_logprobs=top), choice.get("finish_reason")


class VLLMOfflineClient(Client):
    """Delphi's in-process vLLM client (``delphi.clients.Offline``): a local model on a GPU.

    Needs ``vllm`` and Delphi; without vllm this raises :class:`DelphiUnavailableError` at
    construction. ``kwargs`` go to ``Offline`` (e.g. ``max_memory``, ``max_model_len``,
    ``num_gpus``, ``batch_size``).
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        super().__init__(model)
        from mneme_plugin.interpret.delphi_compat import VLLM_HINT, DelphiUnavailableError, import_delphi, vllm_installed

        if not vllm_installed():
            raise DelphiUnavailableError(VLLM_HINT)
        clients = import_delphi("delphi.clients")
        self.delphi_client = clients.Offline(model, **kwargs)

    async def generate(self, prompt: Prompt, **kwargs: Any) -> Response:
        out = await self.delphi_client.generate(prompt, **kwargs)
        return Response(out.text, getattr(out, "logprobs", None), getattr(out, "prompt_logprobs", None))


_ADAPTER: Any = None


def as_delphi_client(client: Client) -> Any:
    """A ``delphi.clients.Client`` that forwards to ``client`` and returns Delphi's ``Response``."""
    global _ADAPTER
    if isinstance(client, VLLMOfflineClient):
        return client.delphi_client
    from mneme_plugin.interpret.delphi_compat import import_delphi

    import_delphi("delphi.clients")
    from delphi.clients.client import Client as DelphiClient
    from delphi.clients.client import Response as DelphiResponse

    if isinstance(client, DelphiClient):
        return client
    if _ADAPTER is None:
        class MnemeDelphiClient(DelphiClient):
            """Delphi ``Client`` forwarding to a mneme_plugin client."""

            def __init__(self, inner: Client) -> None:
                super().__init__(inner.model)
                self.inner = inner

            async def generate(self, prompt, **kwargs):  # type: ignore[override]
                out = await self.inner.generate(prompt, **kwargs)
                return DelphiResponse(text=out.text, logprobs=out.logprobs, prompt_logprobs=out.prompt_logprobs)

        _ADAPTER = MnemeDelphiClient
    return _ADAPTER(client)


def make_client(config: Any, default_cache_dir: str | os.PathLike[str] | None = None) -> Client | None:
    """The client described by a ``ClientConfig`` (None for kind "none")."""
    if config.kind == "none":
        return None
    if config.kind == "openai":
        problem = config.key_problem("client")
        if problem:
            raise ConfigError(problem)
        return OpenAICompatibleClient(
            config.model, config.base_url, resolve_api_key(config.api_key), config.concurrency, config.max_retries,
            config.backoff_base, config.backoff_max, config.timeout, config.max_tokens,
            config.cache_dir or default_cache_dir, config.extra,
        )
    if config.kind == "vllm":
        return VLLMOfflineClient(config.model, **config.extra)
    if config.kind == "stub":
        return StubClient(config.model or "stub")
    raise ConfigError(f"Unknown client kind {config.kind!r}.")
