"""Running a request's choices on an engine: collected (JSON answer) or streamed (server-sent events).

Both paths start every choice and wait for each one's first delta before answering, so a request the
engine refuses (bad schema, prompt too long, queue full) gets a proper HTTP error status, never a
200 followed by an error event. Both enforce the per-request deadline; a stream that outlives it
ends with an OpenAI-shaped error event. The SSE framing is `data: <json>\\n\\n`, ending with
`data: [DONE]`, as the `openai` client expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from medtune.serve.engines.base import Engine, GenerationRequest, GenerationResult, StreamDelta, TokenLogprob
from medtune.serve.errors import RequestTimeout, ServeError

Chunk = Callable[[int, StreamDelta], dict[str, Any] | None]


class Choices:
    """The n choices of one request, started together on an engine."""

    def __init__(
        self, engine: Engine, reqs: list[GenerationRequest], deadline: float, timeout: float
    ) -> None:
        self.engine = engine
        self.reqs = reqs
        self.deadline = deadline  # loop.time() value
        self.timeout = timeout
        self.iters = [engine.stream(r) for r in reqs]
        self.first: list[StreamDelta] = []
        self.ttft: float | None = None
        self._t0 = time.perf_counter()

    def _timeout_error(self) -> RequestTimeout:
        return RequestTimeout(f"the request did not finish within the server's timeout of {self.timeout:g} s")

    async def start(self) -> None:
        """Submit every choice and wait for its first delta (raises the engine's refusal)."""
        try:
            async with asyncio.timeout_at(self.deadline):
                self.first = list(await asyncio.gather(*(anext(it) for it in self.iters)))
        except TimeoutError:
            await self.close()
            raise self._timeout_error() from None
        except BaseException:
            await self.close()
            raise
        self.ttft = time.perf_counter() - self._t0

    async def close(self) -> None:
        for it in self.iters:
            with contextlib.suppress(Exception):
                await it.aclose()  # type: ignore[attr-defined]

    async def collect(self) -> list[GenerationResult]:
        """Every choice's full result (after `start`)."""

        async def rest(i: int) -> GenerationResult:
            deltas = [self.first[i]]
            if deltas[0].finish_reason is None:
                async for d in self.iters[i]:
                    deltas.append(d)
            return _result(deltas, self.reqs[i].sampling.logprobs)

        try:
            async with asyncio.timeout_at(self.deadline):
                return list(await asyncio.gather(*(rest(i) for i in range(len(self.iters)))))
        except TimeoutError:
            raise self._timeout_error() from None
        finally:
            await self.close()

    async def deltas(self) -> AsyncIterator[tuple[int, StreamDelta]]:
        """(choice index, delta) in arrival order across choices (after `start`)."""
        queue: asyncio.Queue[tuple[int, StreamDelta | BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                if self.first[i].finish_reason is None:
                    async for d in self.iters[i]:
                        await queue.put((i, d))
            except BaseException as exc:
                await queue.put((i, exc))
            await queue.put((i, None))

        for i, d in enumerate(self.first):
            yield i, d
        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.iters))]
        open_ = len(tasks)
        try:
            async with asyncio.timeout_at(self.deadline):
                while open_:
                    i, item = await queue.get()
                    if item is None:
                        open_ -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield i, item
        except TimeoutError:
            raise self._timeout_error() from None
        finally:
            for t in tasks:
                t.cancel()
            await self.close()


def _result(deltas: list[StreamDelta], logprobs: bool) -> GenerationResult:
    last = deltas[-1]
    lps: list[TokenLogprob] | None = [lp for d in deltas for lp in (d.logprobs or [])] if logprobs else None
    return GenerationResult(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        finish_reason=last.finish_reason or "stop",
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        logprobs=lps,
    )


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def event_stream(
    choices: Choices,
    chunk: Chunk,
    head: list[dict[str, Any]],
    usage_chunk: Callable[[int, int], dict[str, Any]] | None,
    on_done: Callable[[int, int], None],
    n: int = 1,
) -> AsyncIterator[bytes]:
    """SSE bytes: `head` chunks, one chunk per delta (`chunk` may skip empty ones), usage, [DONE].

    Choices come n per prompt (choice i answers prompt i // n), so each prompt is counted once."""
    prompt, completion = [0] * len(choices.iters), [0] * len(choices.iters)
    try:
        for obj in head:
            yield sse(obj)
        async for i, delta in choices.deltas():
            prompt[i], completion[i] = delta.prompt_tokens, delta.completion_tokens
            obj = chunk(i, delta)
            if obj is not None:
                yield sse(obj)
        if usage_chunk is not None:
            yield sse(usage_chunk(sum(prompt[::n]), sum(completion)))
    except ServeError as exc:
        yield sse(exc.body())
    finally:
        on_done(sum(prompt[::n]), sum(completion))
    yield sse("[DONE]")
