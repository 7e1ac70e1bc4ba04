"""ASGI middlewares around the app: request-size limit, metrics and a content-free access log.

- `BodyLimitMiddleware` answers 413 for a body above the limit (by Content-Length, or while
  reading a chunked body) before any route parses it.
- `ObserveMiddleware` counts every answer by route and status (errors included), times it until
  the last byte, and logs one line per request: method, path, status, seconds. Never the body:
  prompts and completions are medical data and are logged only with `--log-prompts`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from medtune.serve.auth import send_error
from medtune.serve.errors import PayloadTooLarge
from medtune.serve.metrics import ServerMetrics

log = logging.getLogger("medtune.serve.access")

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/health", "/metrics")


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is {size} bytes, above the server's limit of {self.max_bytes}"
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, self._too_large(int(length)))
            return
        # Read the body up front (it is bounded), then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await send_error(send, self._too_large(f"more than {size}"))
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ObserveMiddleware:
    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        start = time.perf_counter()
        status = 500

        async def observe(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.observe_request(route, status, seconds)
            log.info("%s %s %d %.3fs", scope["method"], path, status, seconds)
