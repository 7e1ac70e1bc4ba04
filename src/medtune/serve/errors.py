"""Errors a serving request can cause, each mapped to an HTTP status and an OpenAI-shaped body.

Engines and the HTTP app raise these; `medtune.serve.app` turns them into

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with the status below. They are `MedtuneError`s, so the same checks used offline (`generate_batch`
from evaluation) surface as plain user errors on the command line.
"""

from __future__ import annotations

from typing import Any

from medtune.errors import MedtuneError


class ServeError(MedtuneError):
    """Base class: `status` is the HTTP status, `type`/`code` the OpenAI error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServeError):
    """400: the request cannot be served as written (names the field in `param`)."""

    status = 400
    type = "invalid_request_error"


class ModelNotFound(BadRequest):
    """400 for an unknown `model` (OpenAI answers 404; vLLM and most clients expect 400 or 404)."""

    code = "model_not_found"


class Unauthorized(ServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ServeError):
    status = 404
    type = "not_found_error"


class Forbidden(ServeError):
    status = 403
    type = "permission_error"


class Conflict(ServeError):
    """409: the resource is busy (e.g. unloading an adapter that requests are using)."""

    status = 409
    type = "conflict_error"


class PayloadTooLarge(ServeError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(ServeError):
    """429: the bounded request queue is full; the client should retry later."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class RequestTimeout(ServeError):
    """408: the request did not finish within the per-request timeout."""

    status = 408
    type = "timeout_error"
    code = "timeout"


class ShuttingDown(ServeError):
    """503: the server is draining after SIGTERM and accepts no new requests."""

    status = 503
    type = "server_error"
    code = "shutting_down"
