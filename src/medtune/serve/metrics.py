"""Prometheus metrics of one server (prometheus_client), exposed at `GET /metrics`.

Each app gets its own registry (several servers can live in one test process), holding the process
collector (resident memory, CPU seconds, open files) and:

    medtune_requests_total{route,status}            every HTTP answer, errors included (401, 413, 429, ...)
    medtune_request_duration_seconds{route}         latency until the last byte
    medtune_time_to_first_token_seconds{route}      latency until the first generated text
    medtune_prompt_tokens_total{model}              tokens in
    medtune_completion_tokens_total{model}          tokens out
    medtune_prompt_tokens_cached_total              prompt tokens whose keys and values came from a cache
    medtune_forced_tokens_total                     tokens a constraint forced (jump-forward decoding)
    medtune_queue_depth                             requests waiting for a batch slot
    medtune_running_requests                        requests being decoded
    medtune_model_loaded                            1 once the model is loaded
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Seconds; CPU diagnosis calls sit around 0.1-1 s, long reports tens of seconds.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class _EngineCounters(Collector):
    """Counters the engine keeps itself (read at each scrape)."""

    def __init__(self, counters: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, (doc, read) in self.counters.items():
            yield CounterMetricFamily(name, doc, value=read())


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float],
                 loaded: Callable[[], float], cached_tokens: Callable[[], float],
                 forced_tokens: Callable[[], float]) -> None:  # fmt: skip
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "medtune_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "medtune_request_duration_seconds", "Request latency until the last byte.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "medtune_time_to_first_token_seconds", "Latency until the first generated text.", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "medtune_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "medtune_completion_tokens", "Tokens generated.", ["model"], registry=r
        )
        Gauge("medtune_queue_depth", "Requests waiting for a batch slot.", registry=r).set_function(
            queue_depth
        )
        Gauge("medtune_running_requests", "Requests being decoded.", registry=r).set_function(running)
        Gauge("medtune_model_loaded", "1 once the model is loaded.", registry=r).set_function(loaded)
        r.register(_EngineCounters({
            "medtune_prompt_tokens_cached": ("Prompt tokens whose keys and values came from a cache.", cached_tokens),
            "medtune_forced_tokens": ("Tokens a constraint forced, fed without a decoding step (jump-forward).",
                                      forced_tokens),
        }))  # fmt: skip

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model=model).inc(prompt)
        self.completion_tokens.labels(model=model).inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
