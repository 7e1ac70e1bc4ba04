"""API-key check for every route but `/health` (an ASGI middleware, so no route can forget it).

Clients send `Authorization: Bearer <key>` (what the `openai` client does with `api_key=`).
Keys are compared in constant time. Without a configured key the server is open, and the
adapter-management routes refuse to work (they load files from the server's disk).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from medtune.serve.errors import ServeError, Unauthorized

OPEN_PATHS = frozenset({"/health"})


async def send_error(send: Any, exc: ServeError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer a raw ASGI request with an OpenAI-shaped error body."""
    body = json.dumps(exc.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.expected is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            reason = "missing API key" if not given else "invalid API key"
            exc = Unauthorized(f"{reason}: send 'Authorization: Bearer <key>' (the server's --api-key)")
            await send_error(send, exc, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
