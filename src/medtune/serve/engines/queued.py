"""What the in-process engines (transformers, llamacpp) share: a bounded waiting queue fed by the event
loop and drained by the engine's scheduler thread, and streaming from each request's own queue.

    class MyEngine(QueuedEngine):
        def _prepare(self, req, loop) -> Sequence: ...  # tokenise and validate; raises serve errors
        @property
        def running(self) -> int: ...                    # requests the scheduler decodes now
        # the scheduler thread pops `self._waiting` under `self._cond` and delivers to each Sequence

`stream` refuses a request with QueueFull (HTTP 429) when `options.max_queue` are already waiting;
`generate_batch` (offline eval, JSONL jobs) queues every request at once, unbounded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterator

from medtune.serve.engines.base import (
    Engine,
    EngineOptions,
    GenerationRequest,
    GenerationResult,
    StreamDelta,
    collect,
)
from medtune.serve.engines.sequence import Sequence
from medtune.serve.errors import BadRequest, QueueFull, ShuttingDown
from medtune.serve.guided import Guide


class QueuedEngine(Engine):
    def __init__(self, options: EngineOptions | None) -> None:
        self.options = options or EngineOptions()
        self.guide: Guide | None = None
        self.vocab = 0  # the model's logits width
        self.turn_end_texts: list[str] = []  # what ends a chat turn, stop strings of chat requests
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.reused_prompt_tokens = 0  # prompt tokens taken from a cache (prefix reuse) instead of computed
        self.forced_tokens = 0  # tokens jump-forward decoding fed without a decoding step of their own
        self._stats_lock = threading.Lock()  # counted from the event loop and the engine's threads
        # Each engine's own logger, so that --log-prompts lines name the engine that wrote them.
        self._log = logging.getLogger(type(self).__module__)

    @abstractmethod
    def _prepare(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> Sequence:
        """The request tokenised and checked, as a Sequence that delivers to `loop`."""

    def _new_sequence(self, req: GenerationRequest, prompt_ids: list[int], eos_ids: set[int],
                      loop: asyncio.AbstractEventLoop | None, jump_supported: bool) -> Sequence:  # fmt: skip
        """`req`, its prompt tokenised, as a Sequence: the prompt, `max_tokens` and `logit_bias` checked
        (serve errors), its constraint's matcher, the chat template's turn ends as stop strings (chat
        requests), jump-forward decoding set up (`_start_jumping`). Engines set `vocab` and
        `turn_end_texts` at start."""
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        budget = self.check_lengths(len(prompt_ids), req.sampling.max_tokens)
        self.check_logit_bias(req.sampling, self.vocab)
        matcher = self.guide.matcher(req.constraint) if req.constraint is not None else None
        seq = Sequence(req, prompt_ids, budget, matcher, self.tokenizer, eos_ids, loop)
        if req.prompt is None and self.turn_end_texts:
            seq.stops = list(dict.fromkeys([*seq.stops, *self.turn_end_texts]))
        self._start_jumping(seq, jump_supported)
        return seq

    def _start_jumping(self, seq: Sequence, supported: bool) -> None:
        """Jump-forward decoding for `seq` (`Sequence.forced_tokens`) when the engine can feed several
        tokens to a row (`supported`), the options allow it and the request wants no log-probabilities
        (forced tokens have none) and no `logit_bias` (forced tokens are not chosen from logits: a bias
        against one could not apply); the tokens forced at the very start are then accepted now, to be
        fed with the prompt. Call once the sequence's stop strings are final."""
        sampling = seq.sampling
        seq.jump_forward = (
            supported
            and self.options.jump_forward
            and not (sampling.logprobs or sampling.top_logprobs or sampling.logit_bias)
        )
        if seq.jump_forward:
            self._count_forced(seq.force_start())

    def _count_forced(self, n: int) -> None:
        if n:
            with self._stats_lock:
                self.forced_tokens += n

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def _submit(self, seq: Sequence, bounded: bool) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is stopping")
            if bounded and len(self._waiting) >= self.options.max_queue:
                raise QueueFull(
                    f"the request queue is full ({self.options.max_queue} waiting, "
                    f"{self.running} running); retry later"
                )
            self._waiting.append(seq)
            self._cond.notify_all()  # the scheduler, and the transformers engine's prefill thread

    def stream(self, req: GenerationRequest) -> AsyncIterator[StreamDelta]:
        return self._stream(req, bounded=True)

    async def _stream(self, req: GenerationRequest, bounded: bool) -> AsyncIterator[StreamDelta]:
        if req.constraint is not None and self.guide is not None and not self.guide.is_cached(req.constraint):
            await asyncio.to_thread(self.guide.compile, req.constraint)  # a new schema: not on the event loop
        seq = self._prepare(req, asyncio.get_running_loop())
        self._submit(seq, bounded)
        if self.options.log_prompts:
            self._log.info("request %s prompt: %r", req.request_id, self.prompt_text(req))
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    if self.options.log_prompts:
                        self._log.info("request %s completion: %r", req.request_id, seq.text)
                    return
        finally:
            seq.cancel()  # frees the slot if the client went away or timed out

    def generate_batch(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        """Offline batch: every request is queued at once (no 429), results in input order."""
        self.start()

        async def run() -> list[GenerationResult]:
            return list(await asyncio.gather(*(collect(r, self._stream(r, bounded=False)) for r in reqs)))

        return asyncio.run(run())
