"""`medtune eval`: a task's production requests against an endpoint or a model folder, scored.

    medtune eval --task aria --data test.jsonl --endpoint http://127.0.0.1:8001 --model aria-ft --out eval/
    medtune eval --task aria --generate 300 --model-path runs/aria/dpo --out eval/

Each example is sent as production sends it (task messages, `response_format`, temperature and
max_tokens; the ARIA diagnosis: json_schema, 0.1, 256) through the official `openai` client, with at
most `concurrency` requests in flight; transient failures (connection errors, 408/409/429/5xx) are
retried by the client with exponential back-off. Every answer is appended to `predictions.jsonl` as
it arrives, keyed by a hash of its request, so a killed run resumes where it stopped: a re-run sends
only the requests that have no answer yet. `eval.json` holds the metrics; `report.py` turns it into
`results.json`, `report.md` and `report.html`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError, DataError, MedtuneError
from medtune.eval.local import generate_answers, request_messages
from medtune.eval.metrics import score_predictions
from medtune.io import write_json

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
EVAL_JSON = "eval.json"


def api_base(endpoint: str) -> str:
    """`http://host:8001` or `http://host:8001/v1` -> `http://host:8001/v1` (what the client wants)."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def server_root(endpoint: str) -> str:
    """The server root (where `/metrics` and `/health` live) for an endpoint URL."""
    return api_base(endpoint)[: -len("/v1")]


def make_client(endpoint: str, api_key: str | None, *, max_retries: int = 3, timeout: float = 120.0):
    from openai import AsyncOpenAI

    # Local servers often need no key, but the client insists on one.
    return AsyncOpenAI(
        base_url=api_base(endpoint), api_key=api_key or "not-needed", max_retries=max_retries, timeout=timeout
    )


def chat_kwargs(task: Any, messages: list[dict[str, str]], model: str) -> dict[str, Any]:
    """The body production sends for one request of `task`."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": task.temperature,
        "max_tokens": task.max_tokens,
    }
    if task.response_format() is not None:
        body["response_format"] = task.response_format()
    return body


def request_key(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:20]


def read_examples(path: str | Path, task: Any) -> list[dict[str, Any]]:
    """Test examples from a dataset file; errors name file and line.

    Task packs read records as they are (`input`, `label`, `messages`, as `Task.generate_test` writes
    them); `qa` reads any conversation format medtune.data knows (messages, ShareGPT, Alpaca, ...)."""
    if task.name == "qa":
        from medtune.data.files import load_records

        return load_records(path, kind="conversation")
    from medtune.data.io import read_rows

    examples = []
    for row in read_rows(path):
        if row.error is not None:
            raise DataError(f"{row.where}: {row.error}")
        if not isinstance(row.value, dict):
            raise DataError(f"{row.where}: expected a JSON object, found {type(row.value).__name__}")
        examples.append(row.value)
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Every record of a predictions file; a line cut short by a kill (the last one) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record:
            records.append(record)
    return records


def load_done(path: Path) -> dict[str, dict[str, Any]]:
    """Finished answers in a predictions file, by request key. Failed requests are not 'done': a
    re-run sends them again."""
    return {r["key"]: r for r in read_answers(path) if r.get("error") is None}


def _check_same_job(out_dir: Path, meta: dict[str, Any]) -> None:
    """Refuse to mix answers of a different model or task into an existing predictions file."""
    meta_path = out_dir / "eval_job.json"
    if meta_path.exists() and (out_dir / PREDICTIONS).exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {meta[k]!r}" for k in diff)
            raise ConfigError(
                f"{out_dir}: holds answers of another evaluation ({shown}); use a new --out folder "
                f"or delete {out_dir / PREDICTIONS}"
            )
    write_json(meta_path, meta)


class _Appender:
    """Appends one JSON line per answer and flushes it, so a kill loses at most the line in flight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _progress(total: int, done: int, description: str, show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not show,
    )
    bar = progress.add_task(description, total=total, completed=done)
    return progress, bar


async def check_endpoint(client: Any, endpoint: str, model: str) -> None:
    """Fail early, with a clear message, when the endpoint is down, refuses the key or lacks the model."""
    import openai

    try:
        served = [m.id for m in (await client.models.list()).data]
    except openai.AuthenticationError:
        raise ConfigError(f"{endpoint}: the API key was refused (401); pass --api-key") from None
    except openai.APIConnectionError:
        raise MedtuneError(f"{endpoint}: cannot connect (is the server running?)") from None
    if served and model not in served:
        raise ConfigError(f"--model {model!r} is not served at {endpoint} (served: {', '.join(served)})")


async def _query_endpoint(
    task: Any,
    pending: list[tuple[str, list[dict[str, str]]]],
    *,
    endpoint: str,
    model: str,
    api_key: str | None,
    concurrency: int,
    max_retries: int,
    timeout: float,
    sink: _Appender,
    advance,
) -> None:
    import openai

    client = make_client(endpoint, api_key, max_retries=max_retries, timeout=timeout)
    try:
        await check_endpoint(client, endpoint, model)
        gate = asyncio.Semaphore(concurrency)

        async def one(key: str, messages: list[dict[str, str]]) -> None:
            async with gate:
                start = time.perf_counter()
                record: dict[str, Any] = {"key": key}
                try:
                    resp = await client.chat.completions.create(**chat_kwargs(task, messages, model))
                    choice = resp.choices[0]
                    record.update(
                        prediction=choice.message.content or "",
                        finish_reason=choice.finish_reason,
                        prompt_tokens=resp.usage.prompt_tokens if resp.usage else None,
                        completion_tokens=resp.usage.completion_tokens if resp.usage else None,
                        error=None,
                    )
                except openai.AuthenticationError:
                    raise ConfigError(f"{endpoint}: the API key was refused (401)") from None
                except openai.APIError as exc:
                    # After the client's retries: record the failure; a re-run tries it again.
                    record.update(prediction="", finish_reason=None, error=f"{type(exc).__name__}: {exc}")
                record["latency_s"] = time.perf_counter() - start
                sink.write(record)
                advance()

        await asyncio.gather(*(one(k, m) for k, m in pending))
    finally:
        await client.close()


def run_eval(
    task: Any,
    examples: list[dict[str, Any]],
    out_dir: str | Path,
    *,
    endpoint: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    model_path: str | Path | None = None,
    engine: str = "transformers",
    concurrency: int = 8,
    batch_size: int = 16,
    max_retries: int = 3,
    timeout: float = 120.0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `examples` against an endpoint (`endpoint` + `model`) or a local model (`model_path`),
    resuming from `out_dir/predictions.jsonl`; write `eval.json` and return it."""
    if (endpoint is None) == (model_path is None):
        raise ConfigError("give either an endpoint (--endpoint URL --model NAME) or --model-path, not both")
    if endpoint is not None and not model:
        raise ConfigError("--endpoint needs --model (the served model name, e.g. aria-ft)")
    out = Path(out_dir)
    requests = [request_messages(ex, task, where=f"example {i + 1}") for i, ex in enumerate(examples)]
    keys = [request_key(m) for m in requests]
    target = {"endpoint": endpoint, "model": model} if endpoint else {"model_path": str(model_path)}
    _check_same_job(out, {"task": task.name, **target})
    done = load_done(out / PREDICTIONS)
    pending: dict[str, list[dict[str, str]]] = {}  # a request repeated in the data is sent once
    for k, m in zip(keys, requests, strict=True):
        if k not in done:
            pending.setdefault(k, m)
    if done:
        log.info("resuming: %d of %d answers already in %s", len(keys) - len(pending), len(keys), out)
    sink = _Appender(out / PREDICTIONS)
    unique = len(set(keys))
    progress, bar = _progress(unique, unique - len(pending), f"eval {task.name}", show_progress)
    started = time.perf_counter()
    try:
        with progress:
            advance = lambda n=1: progress.advance(bar, n)  # noqa: E731
            if endpoint is not None and pending:
                asyncio.run(
                    _query_endpoint(
                        task, list(pending.items()), endpoint=endpoint, model=model, api_key=api_key,
                        concurrency=concurrency, max_retries=max_retries, timeout=timeout,
                        sink=sink, advance=advance,
                    )
                )  # fmt: skip
            elif pending:
                _generate_local(task, list(pending.items()), model_path, engine, batch_size, sink, advance)
    finally:
        sink.close()
    elapsed = time.perf_counter() - started
    return finalize(task, examples, keys, out, target=target, elapsed_s=elapsed)


def _generate_local(task, pending, model_path, engine, batch_size, sink: _Appender, advance) -> None:
    def on_batch(start: int, texts: list[str], reasons: list[str]) -> None:
        for (key, _), text, reason in zip(pending[start : start + len(texts)], texts, reasons, strict=True):
            sink.write({"key": key, "prediction": text, "finish_reason": reason, "error": None})
        advance(len(texts))

    generate_answers(
        model_path,
        [m for _, m in pending],
        response_format=task.response_format(),
        max_tokens=task.max_tokens,
        batch_size=batch_size,
        engine=engine,
        on_batch=on_batch,
    )


def finalize(
    task: Any,
    examples: list[dict[str, Any]],
    keys: list[str],
    out: Path,
    *,
    target: dict[str, Any],
    elapsed_s: float | None = None,
) -> dict[str, Any]:
    """Score the answers on disk (in data order) and write `eval.json`."""
    lines = read_answers(out / PREDICTIONS)
    by_key = {r["key"]: r for r in lines if r.get("error") is None}
    wanted = set(keys)
    failed = {
        r["key"]: r["error"]
        for r in lines
        if r.get("error") and r["key"] in wanted and r["key"] not in by_key
    }
    predictions = [by_key[k]["prediction"] if k in by_key else "" for k in keys]
    metrics = score_predictions(task, examples, predictions)
    latencies = [
        by_key[k]["latency_s"] for k in keys if k in by_key and by_key[k].get("latency_s") is not None
    ]
    result = {
        "task": task.name,
        **target,
        "n": len(examples),
        "answered": sum(1 for k in keys if k in by_key),
        "errors": len(failed),
        "error_rate": len(failed) / len(wanted),
        "elapsed_s": elapsed_s,
        "metrics": metrics,
        "latencies_s": latencies,
    }
    if failed:
        log.warning("%d request(s) failed after retries (first: %s); re-run to retry them", len(failed),
                    next(iter(failed.values())))  # fmt: skip
    write_json(out / EVAL_JSON, result)
    return result
