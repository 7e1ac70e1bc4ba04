"""`medtune bench`: latency and throughput of an OpenAI-compatible endpoint under load.

    medtune bench --endpoint http://127.0.0.1:8001 --model aria-ft --task aria --out bench/ \
        --concurrency 1,2,4,8,16 --requests 64

For each concurrency level, `c` clients send the task's production request (the ARIA diagnosis with
its json_schema, temperature 0.1, max_tokens 256), each sending its next request when the previous
one is answered, until the level's fixed budget of requests is spent. Requests are streamed so the
time to first token is measured; the usage chunk (`stream_options.include_usage`) gives the token
count. Reported per level: latency P50/P95/P99, TTFT P50/P95/P99, completion tokens/s, requests/s,
error rate. Errors are not retried here: a server that sheds load must show it.

Memory: while the sweep runs, the server's Prometheus `/metrics` is polled and the largest
`process_resident_memory_bytes` (the default process collector) is kept as the peak resident memory,
with any `*gpu*memory*bytes` gauge likewise; for a server on this machine nvidia-smi's GPU memory
in use is sampled as well. Endpoints without `/metrics` (Ollama) report no resident memory.
Works against medtune's server, vLLM, llama.cpp's server and Ollama's `/v1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from medtune.errors import ConfigError
from medtune.eval.runner import chat_kwargs, check_endpoint, make_client, server_root
from medtune.io import write_json

log = logging.getLogger(__name__)

BENCH_JSON = "bench.json"


@dataclass
class LevelResult:
    """One concurrency level's numbers (seconds, tokens, requests)."""

    concurrency: int
    requests: int
    errors: int
    error_rate: float
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as numpy), None for no values."""
    return float(np.percentile(values, q)) if values else None


def parse_levels(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; each level a positive integer."""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--concurrency: expected comma-separated integers like 1,2,4,8, found {text!r}"
        ) from None
    if not levels or any(c < 1 for c in levels):
        raise ConfigError(f"--concurrency: levels must be integers >= 1, found {text!r}")
    return levels


async def _one_streamed(client: Any, body: dict[str, Any]) -> tuple[float, float | None, int]:
    """(latency, time to first token, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    stream = await client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter() - start
    latency = time.perf_counter() - start
    # Servers without include_usage: one content chunk per token is the usual streaming granularity.
    return latency, first, usage_tokens if usage_tokens is not None else chunks


async def _level(client: Any, bodies: list[dict[str, Any]], concurrency: int) -> LevelResult:
    import openai

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    errors: list[str] = []

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            body = queue.get_nowait()
            try:
                latency, ttft, n = await _one_streamed(client, body)
            except openai.AuthenticationError:
                raise ConfigError("the API key was refused (401); pass --api-key") from None
            except openai.APIError as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            latencies.append(latency)
            tokens += n
            if ttft is not None:
                ttfts.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return LevelResult(
        concurrency=concurrency,
        requests=len(bodies),
        errors=len(errors),
        error_rate=len(errors) / len(bodies),
        wall_s=wall,
        requests_per_s=len(latencies) / wall,
        tokens_per_s=tokens / wall,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        latency_p99_s=percentile(latencies, 99),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        ttft_p99_s=percentile(ttfts, 99),
        latencies_s=latencies,
        ttfts_s=ttfts,
        error_samples=errors[:5],
    )


def parse_memory(metrics_text: str) -> dict[str, float]:
    """Memory gauges from a Prometheus exposition: resident bytes and any GPU memory bytes."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name = sample.name
            if name == "process_resident_memory_bytes" or (
                "gpu" in name and "memory" in name and "bytes" in name
            ):
                found[name] = max(found.get(name, 0.0), float(sample.value))
    return found


async def nvidia_smi_memory() -> float | None:
    """GPU memory in use on this machine (bytes, summed over GPUs) from nvidia-smi, None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    try:
        mib = [float(line) for line in out.decode().split() if line.strip()]
    except ValueError:
        return None
    return sum(mib) * 1024 * 1024 if proc.returncode == 0 and mib else None


class _MemoryWatcher:
    """Polls `/metrics` while the sweep runs and keeps the peak of each memory gauge. For a server on
    this machine, nvidia-smi's GPU memory in use is sampled too (servers seldom export it)."""

    def __init__(self, root: str, api_key: str | None, interval: float = 0.5) -> None:
        self.url = root + "/metrics"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.interval = interval
        self.local = urlsplit(root).hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0")
        self.peak: dict[str, float] = {}
        self.available = False

    def _keep(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.peak[k] = max(self.peak.get(k, 0.0), v)

    async def sample(self, http: Any) -> None:
        import httpx

        if self.local:
            gpu = await nvidia_smi_memory()
            if gpu is not None:
                self._keep({"nvidia_smi_gpu_memory_bytes": gpu})
        try:
            resp = await http.get(self.url, headers=self.headers, timeout=5.0)
        except httpx.HTTPError:  # no /metrics, or busy: memory is best effort
            return
        if resp.status_code != 200:
            return
        try:
            values = parse_memory(resp.text)
        except ValueError:
            return
        self.available = self.available or bool(values)
        self._keep(values)

    async def run(self, stop: asyncio.Event) -> None:
        import httpx

        async with httpx.AsyncClient() as http:
            while not stop.is_set():
                await self.sample(http)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
            await self.sample(http)


async def _sweep(
    endpoint: str,
    model: str,
    api_key: str | None,
    bodies: list[dict[str, Any]],
    levels: list[int],
    timeout: float,
) -> tuple[list[LevelResult], dict[str, float], bool]:
    import openai

    client = make_client(endpoint, api_key, max_retries=0, timeout=timeout)
    watcher = _MemoryWatcher(server_root(endpoint), api_key)
    stop = asyncio.Event()
    watch = asyncio.create_task(watcher.run(stop))
    try:
        await check_endpoint(client, endpoint, model)
        try:
            await _one_streamed(client, bodies[0])  # warm-up: load, grammar compilation, caches
        except openai.BadRequestError as exc:
            raise ConfigError(
                f"{endpoint}: the server refused the benchmark request: {exc.message}"
            ) from None
        results = []
        for c in levels:
            log.info("bench: concurrency %d, %d requests", c, len(bodies))
            results.append(await _level(client, bodies, c))
    finally:
        stop.set()
        await watch
        await client.close()
    return results, watcher.peak, watcher.available


def run_bench(
    task: Any,
    out_dir: str | Path,
    *,
    endpoint: str,
    model: str,
    api_key: str | None = None,
    levels: list[int] | None = None,
    requests: int = 64,
    seed: int = 0,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run the sweep, write `bench.json` in `out_dir` and return it."""
    levels = levels or [1, 2, 4, 8, 16]
    if requests < 1:
        raise ConfigError(f"--requests: expected at least 1, found {requests}")
    bodies = [chat_kwargs(task, ex["messages"], model) for ex in task.generate_test(requests, seed)]
    results, memory, metrics_seen = asyncio.run(_sweep(endpoint, model, api_key, bodies, levels, timeout))
    result = {
        "task": task.name,
        "endpoint": endpoint,
        "model": model,
        "requests_per_level": requests,
        "levels": [asdict(r) for r in results],
        "peak_resident_memory_bytes": memory.get("process_resident_memory_bytes"),
        "peak_gpu_memory_bytes": max((v for k, v in memory.items() if "gpu" in k), default=None),
        "metrics_endpoint": metrics_seen,
    }
    write_json(Path(out_dir) / BENCH_JSON, result)
    return result
