"""Overload, timeouts and shutdown on real server processes: 429, 408, draining on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest

MESSAGES = [{"role": "user", "content": "Mesures du coureur : valgus_genou = 12.4. Diagnostic ?"}]


@pytest.fixture(scope="module")
def tight_server(server_factory, tiny_model_dir):
    """One request decoding, one waiting, anything more refused. The untrained tiny model rarely
    stops on its own, so long answers really take long."""
    return server_factory(tiny_model_dir, args=["--max-batch-size", "1", "--max-queue", "1"])


def _post(server, body: dict, client: httpx.AsyncClient | None = None):
    return client.post(f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers())


def test_a_full_queue_answers_429_and_the_server_keeps_serving(tight_server):
    body = {"model": "aria-ft", "messages": MESSAGES, "max_tokens": 900, "temperature": 0}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(_post(tight_server, body, client) for _ in range(6)))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(429) >= 4, statuses
    refused = next(r for r in responses if r.status_code == 429).json()["error"]
    assert refused["type"] == "rate_limit_error" and refused["code"] == "queue_full"
    assert set(statuses) <= {200, 429}
    ok = httpx.post(f"{tight_server.base_url}/v1/chat/completions", headers=tight_server.headers(), timeout=60,
                    json={"model": "aria-ft", "messages": MESSAGES, "max_tokens": 1})  # fmt: skip
    assert ok.status_code == 200


def test_a_request_over_the_timeout_gets_408(server_factory, tiny_model_dir):
    # 950 tokens in 50 ms would take ~20000 tokens/s: far beyond this engine on a CPU.
    server = server_factory(tiny_model_dir, args=["--request-timeout", "0.05"])
    r = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers(), timeout=60,
                   json={"model": "aria-ft", "messages": MESSAGES, "max_tokens": 950, "temperature": 0})  # fmt: skip
    assert r.status_code == 408
    assert r.json()["error"]["code"] == "timeout"
    for _ in range(50):  # the timed-out request frees its batch slot at the scheduler's next step
        metrics = httpx.get(f"{server.base_url}/metrics", headers=server.headers(), timeout=10).text
        if "medtune_running_requests 0.0" in metrics:
            break
        time.sleep(0.1)
    assert "medtune_running_requests 0.0" in metrics
    assert 'medtune_requests_total{route="/v1/chat/completions",status="408"}' in metrics
    server.stop()


def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(server_factory, tiny_model_dir):
    server = server_factory(tiny_model_dir, args=["--grace-period", "60"])
    body = {"model": "aria-ft", "messages": MESSAGES, "max_tokens": 900, "temperature": 0, "stream": True}
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers(),
                          timeout=120) as r:  # fmt: skip
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):  # the listening socket is closed: new connections are refused
        httpx.get(f"{server.base_url}/health", timeout=5).raise_for_status()
    reader.join(120)
    assert lines[-1] == "data: [DONE]"  # the request in flight ran to its end
    assert any('"finish_reason":"length"' in line.replace(" ", "") for line in lines)
    # uvicorn re-raises the captured SIGTERM once drained, as process managers expect.
    assert server.process.wait(60) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()
