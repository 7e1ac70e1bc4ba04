"""Where the chat, batch and web faces get their answers: a model loaded here, or a running server.

    backend = open_backend(model="runs/aria/dpo")                        # in-process engine
    backend = open_backend(endpoint="http://127.0.0.1:8001/v1", model="aria-ft", api_key="...")
    for piece in backend.stream(ChatRequest(messages=[...])): ...      # text as it is decoded
    result = backend.complete(ChatRequest(messages=[...], response_format={...}))
    for index, outcome in backend.complete_many(requests, concurrency=8): ...   # as each finishes

`LocalBackend` drives the serving engine (`medtune.serve.engines`) exactly as `medtune serve` does,
so a local chat formats prompts and enforces `response_format` the same way the server would.
`RemoteBackend` uses the official `openai` client against any OpenAI-compatible endpoint
(medtune's server, vLLM, llama.cpp, Ollama's `/v1`).

Both expose one synchronous API; underneath, each owns an asyncio loop on a background thread, so
terminal code, Gradio's worker threads and the batch job can all call it without an event loop of
their own, while concurrent requests still reach the engine together and get batched there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from medtune.errors import MedtuneError, ModelError

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


@dataclass
class ChatRequest:
    """One chat completion, in OpenAI terms. `model` picks an adapter or served model (None: default)."""

    messages: list[dict[str, Any]]
    model: str | None = None
    temperature: float = 0.7
    max_tokens: int | None = 256
    response_format: dict[str, Any] | None = None
    # Interactive faces: lower max_tokens to what the context leaves instead of refusing the request
    # (only a local model knows its context; a server still answers 400 when it does not fit).
    fit_context: bool = False


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Backend(ABC):
    """A source of chat completions with a synchronous API over a private event loop."""

    #: What `models()` lists first and what a request with model=None uses.
    default_model: str

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="medtune-backend", daemon=True)
        self._thread.start()

    # -- implemented by each backend -------------------------------------------------------------------

    @abstractmethod
    def describe(self) -> str:
        """One line for people: which model answers, and where it runs."""

    @abstractmethod
    def models(self) -> list[str]:
        """Model names a request may pick: the default first, then adapters or other served models."""

    @abstractmethod
    def _astream(self, req: ChatRequest) -> AsyncIterator[str]:
        """Async generator of text pieces (runs on the backend's loop)."""

    @abstractmethod
    async def _acomplete(self, req: ChatRequest) -> ChatResult: ...

    async def _aclose(self) -> None:  # noqa: B027  (optional hook)
        """Free resources; runs on the loop just before it stops."""

    # -- synchronous API -------------------------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def complete(self, req: ChatRequest) -> ChatResult:
        """The whole answer; raises MedtuneError subclasses for requests the model refuses."""
        return self._submit(self._acomplete(req)).result()

    def stream(self, req: ChatRequest) -> Iterator[str]:
        """Text pieces as they are decoded. Closing the iterator early cancels the request."""
        out: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for piece in self._astream(req):
                    out.put(piece)
            except BaseException as exc:  # handed to the consuming thread, re-raised there
                out.put(exc)
            finally:
                out.put(_DONE)

        future = self._submit(pump())
        try:
            while (item := out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def complete_many(
        self, requests: Iterable[tuple[Any, ChatRequest]], concurrency: int = 8
    ) -> Iterator[tuple[Any, ChatResult | MedtuneError]]:
        """Run (key, request) pairs with up to `concurrency` in flight; yield (key, result) as each
        finishes, or (key, error) for a request refused with a MedtuneError. Other errors propagate."""
        out: queue.Queue[Any] = queue.Queue()
        pairs = iter(requests)  # consumed lazily: a long file is never all in flight or in memory

        async def worker() -> None:
            for key, req in pairs:  # one shared iterator: each pair goes to exactly one worker
                try:
                    out.put((key, await self._acomplete(req)))
                except MedtuneError as exc:
                    out.put((key, exc))

        async def drive() -> None:
            try:
                await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
            except BaseException as exc:
                out.put(exc)
            finally:
                out.put(_DONE)

        future = self._submit(drive())
        try:
            while (item := out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()

    def close(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self._submit(self._aclose()).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalBackend(Backend):
    """A model loaded in this process through the serving engine (transformers or llama.cpp)."""

    def __init__(self, model: str, adapters: dict[str, str] | None = None, engine: str | None = None) -> None:
        from medtune.serve.cli import resolve_model
        from medtune.serve.engines import EngineOptions, create_engine

        path = resolve_model(model)  # a run folder -> its newest merged stage, as `medtune serve` does
        name = engine or ("llamacpp" if path.suffix == ".gguf" else "transformers")
        self.engine = create_engine(name, str(path), adapters=adapters or {}, options=EngineOptions())
        self.path, self.engine_name = path, name
        self.default_model = "base"
        super().__init__()
        # Start on the loop thread: an engine may bind its scheduler to the loop that starts it.
        self._submit(self._astart()).result()

    async def _astart(self) -> None:
        self.engine.start()

    def describe(self) -> str:
        return f"{self.path} (loaded in this process, {self.engine_name} engine)"

    def models(self) -> list[str]:
        return [self.default_model, *self.engine.list_adapters()]

    def _request(self, req: ChatRequest) -> Any:
        from medtune.eval.local import response_constraint
        from medtune.serve.engines.base import GenerationRequest, SamplingParams

        adapter = None if req.model in (None, self.default_model) else req.model
        max_tokens = req.max_tokens
        if req.fit_context and max_tokens is not None:
            room = self.engine.max_context - self.engine.count_tokens(self.engine.render(req.messages))
            max_tokens = max(1, min(max_tokens, room))  # room <= 0: the engine reports the long prompt
        return GenerationRequest(
            messages=req.messages,
            sampling=SamplingParams(temperature=req.temperature, max_tokens=max_tokens),
            constraint=response_constraint(req.response_format),
            adapter=adapter,
        )

    async def _astream(self, req: ChatRequest) -> AsyncIterator[str]:
        async for delta in self.engine.stream(self._request(req)):
            if delta.text:
                yield delta.text

    async def _acomplete(self, req: ChatRequest) -> ChatResult:
        r = await self.engine.generate(self._request(req))
        return ChatResult(r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens)

    async def _aclose(self) -> None:
        self.engine.close()


class RemoteBackend(Backend):
    """Any OpenAI-compatible endpoint, through the official `openai` client."""

    def __init__(self, endpoint: str, model: str | None = None, api_key: str | None = None) -> None:
        import openai

        base = endpoint.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.endpoint = base
        # The client refuses an empty key; servers without auth ignore whatever is sent.
        self.client = openai.AsyncOpenAI(base_url=base, api_key=api_key or "none", max_retries=2)
        super().__init__()
        self._served = self._submit(self._list_models()).result()
        if model is not None and model not in self._served:
            raise ModelError(
                f"--model {model}: {base} does not serve it (it serves: {', '.join(self._served)})"
            )
        self.default_model = model or self._served[0]

    async def _list_models(self) -> list[str]:
        import openai

        try:
            page = await self.client.models.list()
        except openai.AuthenticationError:
            raise ModelError(
                f"{self.endpoint}: the API key was refused (set --api-key or MEDTUNE_API_KEY)"
            ) from None
        except openai.APIConnectionError:
            raise ModelError(f"{self.endpoint}: cannot connect (is the server running?)") from None
        names = [m.id for m in page.data]
        if not names:
            raise ModelError(f"{self.endpoint}: the server lists no models")
        return names

    def describe(self) -> str:
        return f"{self.default_model} at {self.endpoint}"

    def models(self) -> list[str]:
        return [self.default_model, *(m for m in self._served if m != self.default_model)]

    def _kwargs(self, req: ChatRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": req.model or self.default_model,
            "messages": req.messages,
            "temperature": req.temperature,
        }
        if req.max_tokens is not None:
            kwargs["max_tokens"] = req.max_tokens
        if req.response_format is not None:
            kwargs["response_format"] = req.response_format
        return kwargs

    async def _astream(self, req: ChatRequest) -> AsyncIterator[str]:
        with _openai_errors(self.endpoint):
            chunks = await self.client.chat.completions.create(**self._kwargs(req), stream=True)
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    async def _acomplete(self, req: ChatRequest) -> ChatResult:
        with _openai_errors(self.endpoint):
            resp = await self.client.chat.completions.create(**self._kwargs(req))
        choice = resp.choices[0]
        usage = resp.usage
        return ChatResult(
            choice.message.content or "",
            choice.finish_reason or "stop",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
        )

    async def _aclose(self) -> None:
        await self.client.close()


@contextlib.contextmanager
def _openai_errors(endpoint: str) -> Iterator[None]:
    """Turn the client's HTTP errors into ModelErrors carrying the server's own message."""
    import openai

    try:
        yield
    except openai.APIStatusError as exc:
        message = exc.message
        if isinstance(exc.body, dict):
            message = exc.body.get("message", message)
        raise ModelError(f"{endpoint}: HTTP {exc.status_code}: {message}") from None
    except openai.APIConnectionError as exc:
        raise ModelError(f"{endpoint}: connection failed: {exc}") from None


def open_backend(
    model: str | None = None,
    endpoint: str | None = None,
    api_key: str | None = None,
    adapters: dict[str, str] | None = None,
) -> Backend:
    """A RemoteBackend when `endpoint` is given (then `model` is a served name), else a LocalBackend
    that loads `model` (a model folder, a run folder or a .gguf file)."""
    if endpoint:
        if adapters:
            raise ModelError("--adapter loads adapters into a local model; a server loads its own")
        return RemoteBackend(endpoint, model=model, api_key=api_key)
    if not model:
        raise ModelError("give --model PATH (a model folder, run folder or .gguf) or --endpoint URL")
    return LocalBackend(model, adapters=adapters)
