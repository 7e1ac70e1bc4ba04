"""The OpenAI-compatible HTTP server (FastAPI): chat and text completions over any `Engine`.

    app = create_app(engine, ServerConfig(served_name="aria-ft", api_key="secret"))
    uvicorn.run(app, port=8001)            # `medtune serve` does this (and drains on SIGTERM)

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (the base model under its
served name and every adapter with `parent` = the base), POST /v1/adapters {name, path} and
DELETE /v1/adapters/{name} (run-time LoRA loading; need an API key), GET /health (no auth) and
GET /metrics (Prometheus). Errors are OpenAI-shaped: {"error": {message, type, param, code}}.
The request's `model` picks the base (served name) or an adapter (its name).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from medtune.serve import schemas
from medtune.serve.auth import ApiKeyMiddleware
from medtune.serve.engines.base import Constraint, Engine, GenerationRequest, SamplingParams, StreamDelta
from medtune.serve.errors import BadRequest, Forbidden, ModelNotFound, ServeError, ShuttingDown
from medtune.serve.metrics import ServerMetrics
from medtune.serve.middleware import BodyLimitMiddleware, ObserveMiddleware
from medtune.serve.streaming import Choices, event_stream

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    served_name: str = "aria-ft"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20  # 1 MiB: far above any clinical prompt, far below a memory problem
    request_timeout: float = 60.0  # seconds, per request (queueing included)
    model_path: str = ""


def _error(exc: ServeError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _unreadable_body(request: Request, err: dict[str, Any]) -> str | None:
    """What to tell the client when the body could not be read as JSON at all (None: it was)."""
    if err.get("type") == "json_invalid":  # loc is ("body", character offset)
        reason = (err.get("ctx") or {}).get("error", "invalid JSON")
        return f"the request body is not valid JSON: {reason} (at character {err['loc'][-1]})"
    kind = request.headers.get("content-type") or "none"
    if tuple(err.get("loc", ())) == ("body",) and "json" not in kind:
        return f"the request body must be a JSON object sent with Content-Type: application/json (got {kind})"
    return None


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The app serving `engine` (started by the caller; closed when the app shuts down)."""
    metrics = ServerMetrics(
        queue_depth=lambda: engine.queue_depth,
        running=lambda: engine.running,
        loaded=lambda: float(bool(engine.health().get("loaded"))),
        cached_tokens=lambda: engine.reused_prompt_tokens,
        forced_tokens=lambda: engine.forced_tokens,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="medtune", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.draining = False
    app.state.engine = engine
    app.state.metrics = metrics
    # Starlette wraps in reverse order: Observe (outermost) -> API key -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    app.add_middleware(ObserveMiddleware, metrics=metrics)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if (unreadable := _unreadable_body(request, err)) is not None:
                return _error(BadRequest(unreadable, param=None))
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        first = [str(p) for p in exc.errors()[0].get("loc", ()) if p != "body"] if exc.errors() else []
        return _error(BadRequest("; ".join(problems), param=".".join(first) or None))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if detail == "There was an error parsing the body":  # FastAPI's words for bytes that are not UTF-8
            detail = "the request body could not be read: JSON must be UTF-8 encoded text"
        err = ServeError(detail)
        err.status, err.type = exc.status_code, "invalid_request_error"
        return _error(err)

    def check_open() -> None:
        if app.state.draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests")

    def adapter_for(model: str) -> str | None:
        if model == config.served_name:
            return None
        if model in engine.list_adapters():
            return model
        known = [config.served_name, *engine.list_adapters()]
        raise ModelNotFound(
            f"model {model!r} does not exist; this server has: {', '.join(known)}", param="model"
        )

    def fan_out(prompt: str, sampling: SamplingParams, constraint: Constraint | None, adapter: str | None,
                n: int, rid: str) -> list[GenerationRequest]:  # fmt: skip
        reqs = []
        for j in range(n):
            seed = None if sampling.seed is None else sampling.seed + j
            reqs.append(GenerationRequest(prompt=prompt, sampling=replace(sampling, seed=seed, stop=list(sampling.stop)),
                                          constraint=constraint, adapter=adapter, request_id=f"{rid}/{j}"))  # fmt: skip
        return reqs

    def start_choices(reqs: list[GenerationRequest]) -> Choices:
        loop = asyncio.get_running_loop()
        return Choices(engine, reqs, loop.time() + config.request_timeout, config.request_timeout)

    def count(route: str, model: str, choices: Choices) -> Any:
        if choices.ttft is not None:
            metrics.ttft.labels(route=route).observe(choices.ttft)
        return lambda p, c: metrics.observe_tokens(model, p, c)

    # -- routes --------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        info = engine.health()
        ok = bool(info.get("loaded")) and not app.state.draining
        status = "ok" if ok else ("draining" if app.state.draining else "loading")
        body = {"status": status, "served_name": config.served_name, **info}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = schemas.now()
        root = config.model_path or str(engine.health().get("model", ""))
        data = [{"id": config.served_name, "object": "model", "created": created, "owned_by": "medtune",
                 "root": root, "parent": None}]  # fmt: skip
        for name, path in sorted(engine.list_adapters().items()):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "medtune",
                         "root": path, "parent": config.served_name})  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(body: schemas.AdapterLoad) -> dict[str, Any]:
        if config.api_key is None:
            raise Forbidden("adapters can be loaded at run time only on a server started with --api-key")
        if body.name == config.served_name:
            raise BadRequest(f"name: {body.name!r} is the base model's served name", param="name")
        await asyncio.to_thread(engine.load_adapter, body.name, body.path)
        return {"id": body.name, "object": "model", "root": engine.list_adapters()[body.name],
                "parent": config.served_name}  # fmt: skip

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        if config.api_key is None:
            raise Forbidden("adapters can be unloaded at run time only on a server started with --api-key")
        await asyncio.to_thread(engine.unload_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(body: schemas.ChatCompletionRequest) -> Any:
        check_open()
        adapter = adapter_for(body.model)
        constraint = body.constraint()
        sampling = body.to_sampling()
        try:
            prompt = engine.render(body.chat_messages())
        except ServeError:
            raise
        except Exception as exc:  # jinja2 raises from inside chat templates (role order, ...)
            raise BadRequest(
                f"messages: the model's chat template rejected them: {exc}", param="messages"
            ) from None
        rid = schemas.new_id("chatcmpl")
        choices = start_choices(fan_out(prompt, sampling, constraint, adapter, body.n, rid))
        await choices.start()
        done = count("/v1/chat/completions", body.model, choices)
        if not body.stream:
            results = await choices.collect()
            response = schemas.chat_response(rid, body.model, results, results[0].prompt_tokens)
            done(response["usage"]["prompt_tokens"], response["usage"]["completion_tokens"])
            return response
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = {"id": rid, "object": "chat.completion.chunk", "created": schemas.now(), "model": body.model}
        if include_usage:
            base["usage"] = None

        def chunk(i: int, d: StreamDelta) -> dict[str, Any] | None:
            if not d.text and d.finish_reason is None and not d.logprobs:
                return None
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            choice = {"index": i, "delta": delta, "logprobs": schemas.chat_logprobs(d.logprobs),
                      "finish_reason": d.finish_reason}  # fmt: skip
            return {**base, "choices": [choice]}

        head = [{**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]} for i in range(body.n)]  # fmt: skip
        usage = (
            (lambda p, c: {**base, "choices": [], "usage": schemas.usage(p, c)}) if include_usage else None
        )
        return StreamingResponse(
            event_stream(choices, chunk, head, usage, done), media_type="text/event-stream"
        )

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest) -> Any:
        check_open()
        adapter = adapter_for(body.model)
        constraint = body.guided_constraint()
        sampling = body.to_sampling()
        rid = schemas.new_id("cmpl")
        reqs = []
        for k, prompt in enumerate(body.prompts()):
            reqs += fan_out(prompt, sampling, constraint, adapter, body.n, f"{rid}/{k}")
        choices = start_choices(reqs)
        await choices.start()
        done = count("/v1/completions", body.model, choices)
        if not body.stream:
            results = await choices.collect()
            prompt_tokens = sum(r.prompt_tokens for r in results[:: body.n])
            response = schemas.completion_response(rid, body.model, results, prompt_tokens)
            done(prompt_tokens, response["usage"]["completion_tokens"])
            return response
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        base = {"id": rid, "object": "text_completion", "created": schemas.now(), "model": body.model}

        def chunk(i: int, d: StreamDelta) -> dict[str, Any] | None:
            if not d.text and d.finish_reason is None and not d.logprobs:
                return None
            choice = {"index": i, "text": d.text, "logprobs": schemas.completion_logprobs(d.logprobs),
                      "finish_reason": d.finish_reason}  # fmt: skip
            return {**base, "choices": [choice]}

        usage = (
            (lambda p, c: {**base, "choices": [], "usage": schemas.usage(p, c)}) if include_usage else None
        )
        stream = event_stream(choices, chunk, [], usage, done, n=body.n)
        return StreamingResponse(stream, media_type="text/event-stream")

    return app
