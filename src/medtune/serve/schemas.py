"""OpenAI request bodies (pydantic) and the response / stream-chunk shapes the server returns.

Requests are validated here (ranges as OpenAI documents them); anything out of range becomes a 400
naming the field. Constrained decoding is asked for with OpenAI's `response_format` or, as in vLLM,
with extra body fields (the `openai` client sends them through `extra_body=`):

    guided_json:   a JSON schema (same as response_format json_schema)
    guided_regex:  a regular expression the whole answer must match
    guided_choice: a list of strings; the answer is exactly one of them
    structured_outputs: {"json": ...} | {"regex": ...} | {"choice": [...]}  (vLLM >= 0.12 spelling)

    client.chat.completions.create(model="aria-ft", messages=..., extra_body={"guided_choice": ["oui", "non"]})
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medtune.serve.engines.base import Constraint, GenerationResult, SamplingParams, TokenLogprob
from medtune.serve.errors import BadRequest

MAX_N = 8  # choices per request: each one costs a batch row
MAX_STOP = 16
MAX_LOGIT_BIAS = 1024  # tokens a request may bias


class _Body(BaseModel):
    # Unknown fields are ignored as OpenAI-compatible servers do (clients send vendor extras).
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise BadRequest(f"messages[{index}].content: required for role {self.role!r}", param="messages")
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise BadRequest(
                    f"messages[{index}].content[{j}]: only text parts are supported, found type {part.type!r}",
                    param="messages",
                )
            parts.append(part.text)
        return "".join(parts)


class JsonSchemaFormat(_Body):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


def lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where in a parsed JSON body a string holds a lone UTF-16 surrogate (JSON's "\\ud83d" escape alone
    is valid JSON but no Unicode text: it cannot be encoded, tokenised or compiled), or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        key = str(key)
        at = f"{where}{key}" if key.startswith("[") else f"{where}.{key}" if where else key
        found = lone_surrogate(key, at) or lone_surrogate(item, at)
        if found:
            return found
    return None


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as OpenAI and vLLM take
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> -100..100
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style constraints (extra_body).
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        where = lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where} is not valid Unicode text (it holds a lone UTF-16 surrogate)")
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, found {len(stops)}")
        return [s for s in stops if s]

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if len(v or {}) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens, found {len(v)}")
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys are token ids (non-negative integers), found {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {key}: a bias is between -100 and 100, found {bias}")
        return v

    def sampling(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=max_tokens,
            stop=list(self.stop or []),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logit_bias={int(k): float(b) for k, b in (self.logit_bias or {}).items()},
        )

    def guided_constraint(self) -> Constraint | None:
        given = [(k, v) for k, v in (("json_schema", self.guided_json), ("regex", self.guided_regex),
                                     ("choice", self.guided_choice)) if v is not None]  # fmt: skip
        if len(given) > 1:
            raise BadRequest(
                "set at most one of guided_json, guided_regex, guided_choice", param="guided_json"
            )
        return Constraint(given[0][0], given[0][1]) if given else None  # type: ignore[arg-type]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # Function calling is not served: refused unless the client says the tools may go unused.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # the legacy spelling

    def constraint(self) -> Constraint | None:
        guided = self.guided_constraint()
        rf = self.response_format
        if rf is None or rf.type == "text":
            return guided
        if guided is not None:
            raise BadRequest(
                "set either response_format or a guided_* field, not both", param="response_format"
            )
        if rf.type == "json_object":
            return Constraint("json_object")
        if rf.json_schema is None:
            raise BadRequest(
                "response_format.json_schema: required when type is json_schema", param="response_format"
            )
        return Constraint("json_schema", rf.json_schema.schema_)

    def to_sampling(self) -> SamplingParams:
        if (self.tools or self.functions) and self.tool_choice != "none":
            param = "tools" if self.tools else "functions"
            raise BadRequest(
                f"{param}: function calling is not supported by this server (answers are text, or JSON "
                'from response_format); send tool_choice "none" to have the tools ignored',
                param=param,
            )
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling(limit, self.logprobs, self.top_logprobs or 0)

    def chat_messages(self) -> list[dict[str, str]]:
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text(i)})
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # token ids are parsed to be refused clearly
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise BadRequest("prompt: expected a string or a non-empty list of strings", param="prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise BadRequest(
                "prompt: token-id prompts are not supported; send the prompt as text", param="prompt"
            )
        if self.suffix:
            raise BadRequest("suffix (text insertion) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise BadRequest("best_of is not supported (set n for several completions)", param="best_of")
        if len(prompts) * self.n > 4 * MAX_N:
            raise BadRequest(f"prompt: at most {4 * MAX_N} prompts x n per request", param="prompt")
        if self.echo:
            raise BadRequest("echo is not supported", param="echo")
        return prompts

    def to_sampling(self) -> SamplingParams:
        return self.sampling(self.max_tokens, self.logprobs is not None, self.logprobs or 0)


class AdapterLoad(_Body):
    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1)


# -- responses ---------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top_logprobs
                ],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists of tokens, logprobs, alternatives and offsets."""
    if entries is None:
        return None
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


def chat_response(
    rid: str, model: str, results: list[GenerationResult], prompt_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    }


def completion_response(
    rid: str, model: str, results: list[GenerationResult], prompt_tokens: int
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": r.text,
                "logprobs": completion_logprobs(r.logprobs),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    }
