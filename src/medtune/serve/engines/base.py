"""The one interface every serving engine implements (transformers, llamacpp, vllm).

The HTTP app (`medtune.serve.app`), offline evaluation and batch inference only talk to an `Engine`:

    engine = TransformersEngine("runs/aria/dpo", adapters={"derm": "adapters/derm"})
    engine.start()                                    # load weights, start the scheduler
    prompt = engine.render(messages)                  # the chat template training used
    result = await engine.generate(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=64)))
    async for delta in engine.stream(req): ...        # StreamDelta per decoded piece, last one has finish_reason
    results = engine.generate_batch([req1, req2])     # sync, for eval / batch JSONL (no event loop needed)
    engine.close()

Contract for engine writers (a new engine is one module in `medtune/serve/engines/` and one line in
`ENGINES` of `medtune.serve.engines`):

- The constructor is `Engine(model: str, adapters: dict[str, str] | None = None,
  options: EngineOptions | None = None)` and does no heavy work; `start()` loads the model.

- A request carries a rendered `prompt` or `messages` (use `prompt_text(req)` to get the text).
  `sampling.n` is always 1 when an engine sees it: the app fans `n > 1` out into n requests.
- Invalid requests raise `medtune.serve.errors` exceptions *before the first delta is yielded*
  (the app awaits the first delta before sending HTTP headers): `BadRequest` for a prompt longer than
  the context, `max_tokens` above what the context leaves (`check_lengths` does both), a `logit_bias`
  token id outside the vocabulary (`check_logit_bias`), an unsupported
  constraint (name the JSON-schema keyword), an unknown adapter; `QueueFull` when the bounded queue is
  full. The app enforces the per-request timeout by cancelling the stream; engines must free the
  request's slot when their async generator is closed early (`GeneratorExit` / cancellation).
- Streamed deltas carry only text that is final: an engine holds back text that could still turn out
  to be the beginning of a stop string, and never emits the stop string itself. Incomplete UTF-8
  sequences are held back too, so `"".join(d.text for d in deltas)` equals the non-streamed text.
- `finish_reason` is "stop" (EOS, a stop string, or a complete constrained answer) or "length"
  (max_tokens or the context ran out, including a constrained answer cut before it was complete).
- Token counts: `prompt_tokens` is the rendered prompt's length, `completion_tokens` the generated
  token count (including a final EOS token, as OpenAI and vLLM count it).
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from medtune.serve.errors import BadRequest

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice"]
FinishReason = Literal["stop", "length"]


@dataclass
class EngineOptions:
    """Settings shared by engines (from `medtune serve` options, `.env` or the recipe's serve section)."""

    max_model_len: int | None = None  # None: the model's own context length
    max_batch_size: int = 16  # requests decoded together
    max_queue: int = 64  # requests waiting beyond the running batch; more get 429
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # CPU threads for the model (None: library default)
    log_prompts: bool = False  # log prompts and completions (medical data: off by default)
    prefix_caching: bool = True  # reuse the cache of a prompt's start shared with the previous prompt
    overlap_prefill: bool = True  # CPU: prefill on a second thread while decoding (when cores allow two)
    enforce_eager: bool = False  # transformers: no traced forward passes (graphs.py), eager ones only
    jump_forward: bool = True  # transformers, llamacpp: grammar-forced tokens are fed, not decoded one by one


@dataclass
class SamplingParams:
    """Per-request sampling settings (OpenAI semantics). temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None  # None: whatever the context leaves after the prompt
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass(frozen=True)
class Constraint:
    """What the output must match.

    kind            payload
    json_schema     the JSON schema (dict)
    json_object     None (any JSON object)
    regex           the pattern (str)
    choice          the allowed strings (list[str]); the output is exactly one of them
    """

    kind: ConstraintKind
    payload: Any = None

    def cache_key(self) -> str:
        """A stable key for caching compiled grammars (same schema -> same key)."""
        return self.kind + ":" + json.dumps(self.payload, sort_keys=True, ensure_ascii=False)


@dataclass
class GenerationRequest:
    """One completion to produce. Set `prompt` (already rendered) or `messages` (rendered by the engine)."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    constraint: Constraint | None = None
    adapter: str | None = None  # a loaded adapter's name, None for the base model
    request_id: str = ""


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int] | None = None


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the `top_logprobs` alternatives (OpenAI's shape)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class StreamDelta:
    """A piece of streamed output. The last delta of a request has `finish_reason` set."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


async def collect(req: GenerationRequest, deltas: AsyncIterator[StreamDelta]) -> GenerationResult:
    """One request's streamed deltas gathered into its whole completion."""
    text: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] | None = [] if req.sampling.logprobs else None
    last = StreamDelta(text="")
    async for delta in deltas:
        text.append(delta.text)
        ids.extend(delta.token_ids)
        if logprobs is not None and delta.logprobs:
            logprobs.extend(delta.logprobs)
        last = delta
    return GenerationResult(
        text="".join(text),
        token_ids=ids,
        finish_reason=last.finish_reason or "stop",
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        logprobs=logprobs,
    )


class Engine(ABC):
    """A loaded model that turns `GenerationRequest`s into text. See the module docstring."""

    name: ClassVar[str]
    tokenizer: Any = None  # a Hugging Face tokenizer when the engine has one (used by `render`)
    reused_prompt_tokens: int = 0  # prompt tokens taken from a cache instead of computed (for /metrics)
    forced_tokens: int = 0  # tokens a constraint forced, fed without a decoding step (for /metrics)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:  # noqa: B027  (optional hook)
        """Load weights and start background work. Called once before the first request."""

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Stop background work and free memory. Requests still running fail."""

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """At least {"loaded": bool, "engine": name, "model": path}; never raises."""

    # -- text ----------------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]]) -> str:
        """Messages -> prompt text with the generation prompt, via the same function training used."""
        from medtune.data.templates import render_chat

        return render_chat(messages, self.tokenizer, add_generation_prompt=True)

    def prompt_text(self, req: GenerationRequest) -> str:
        if req.prompt is not None:
            return req.prompt
        if req.messages is None:
            raise BadRequest("a request needs a prompt or messages", param="messages")
        return self.render(req.messages)

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens `text` takes as a prompt (special tokens the engine adds included)."""

    @property
    @abstractmethod
    def max_context(self) -> int:
        """Prompt + completion tokens the engine accepts."""

    def check_lengths(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """Raise BadRequest if the prompt or max_tokens do not fit; return the completion budget."""
        room = self.max_context - prompt_tokens
        if room <= 0:
            raise BadRequest(
                f"the prompt is {prompt_tokens} tokens, longer than the model's context of "
                f"{self.max_context} tokens (it leaves no room for an answer)",
                param="messages",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise BadRequest(
                f"max_tokens is {max_tokens} but the context of {self.max_context} tokens leaves "
                f"{room} after the {prompt_tokens}-token prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    def check_logit_bias(self, sampling: SamplingParams, vocab: int) -> None:
        """Raise BadRequest if `logit_bias` names a token id outside the model's `vocab` ids."""
        outside = sorted(t for t in sampling.logit_bias if not 0 <= t < vocab)
        if outside:
            raise BadRequest(
                f"logit_bias: token id {outside[0]} is not in the model's vocabulary (ids 0 to {vocab - 1})",
                param="logit_bias",
            )

    # -- generation ----------------------------------------------------------------------------------

    @abstractmethod
    def stream(self, req: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Async generator of deltas; raises serve errors before the first delta for bad requests."""

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """The whole completion (collects `stream`)."""
        return await collect(req, self.stream(req))

    def generate_batch(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        """Synchronous batch inference (offline eval, JSONL in / JSONL out); results in input order.

        Must not be called from inside a running event loop (use `generate` there).
        """

        async def run() -> list[GenerationResult]:
            return list(await asyncio.gather(*(self.generate(r) for r in reqs)))

        return asyncio.run(run())

    # -- adapters ------------------------------------------------------------------------------------

    def list_adapters(self) -> dict[str, str]:
        """Loaded adapters: name -> folder they came from."""
        return {}

    def load_adapter(self, name: str, path: str) -> None:
        raise BadRequest(f"the {self.name} engine cannot load adapters at run time", param="name")

    def unload_adapter(self, name: str) -> None:
        raise BadRequest(f"the {self.name} engine cannot unload adapters at run time", param="name")

    # -- load, for /metrics --------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests waiting to be scheduled."""
        return 0

    @property
    def running(self) -> int:
        """Requests being decoded now."""
        return 0
