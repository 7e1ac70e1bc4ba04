"""A recording stand-in for an OpenAI-compatible server, to see exactly what the UI faces send.

The stub answers every chat request with `echo <number of messages>: <last user message>` (streamed
in several SSE chunks when asked), lists two models, and keeps every request body in `.requests`.
It stands in for the server only where a test must inspect requests; answers from a real model are
tested against the tiny model.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class StubServer:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    models: tuple[str, ...] = ("stub-model", "stub-adapter")
    delay: float = 0.0  # seconds before each chat answer (to catch a batch job mid-way)


def _answer(body: dict[str, Any]) -> str:
    users = [m["content"] for m in body["messages"] if m["role"] == "user"]
    if body.get("response_format"):
        return json.dumps({"echo": users[-1] if users else ""})
    return f"echo {len(body['messages'])}: {users[-1] if users else ''}"


@pytest.fixture
def stub_openai() -> Iterator[StubServer]:
    stub = StubServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._json(
                    200, {"object": "list", "data": [{"id": m, "object": "model"} for m in stub.models]}
                )
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.requests.append(body)
            time.sleep(stub.delay)
            if body["model"] not in stub.models:
                self._json(400, {"error": {"message": f"unknown model {body['model']}", "type": "x"}})
                return
            text = _answer(body)
            base = {"id": "c1", "created": 0, "model": body["model"]}
            if not body.get("stream"):
                self._json(
                    200,
                    base
                    | {
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                    },
                )
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                chunk = base | {
                    "object": "chat.completion.chunk",
                    "choices": [
                        {"index": 0, "delta": {"content": piece}, "finish_reason": "stop" if last else None}
                    ],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield stub
    server.shutdown()
    server.server_close()
