"""Batch inference: JSONL queries in, JSONL answers out, safe to kill and re-run.

    medtune infer --model runs/aria/dpo --input queries.jsonl --output predictions.jsonl

Each input line is a JSON object with `query` (a user message; `system` optional) or `messages`
(a conversation), and optionally `id`, `response_format` (OpenAI's, e.g. a json_schema), `model`
(an adapter or served name), `temperature` and `max_tokens`. A line's id is its `id` field, or
`line-N` (its 1-based line number) when it has none.

Each answer is appended to the output as soon as it is done (written, flushed and fsync'ed), as the
input record plus `line`, `response`, `finish_reason` and `usage`; answers come in completion
order, join on `id`. A re-run skips every id already in the output, so a killed job resumes where
it stopped and never writes an id twice. A bad line (broken JSON, missing field, a request the
model refuses) is reported with its line number and skipped; it never stops the batch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.errors import DataError
from medtune.ui.backends import Backend, ChatRequest, ChatResult

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}


@dataclass
class BadLine:
    line: int
    reason: str


@dataclass
class InferSummary:
    """What a run did: `answered` now, `skipped_done` from an earlier run, `bad` lines reported."""

    total: int = 0
    answered: int = 0
    skipped_done: int = 0
    bad: list[BadLine] = field(default_factory=list)


@dataclass
class Query:
    line: int
    id: str
    record: dict[str, Any]
    request: ChatRequest


def parse_query(text: str, line: int, *, system: str | None, temperature: float, max_tokens: int) -> Query:
    """One input line -> Query; raises DataError saying what is wrong with it."""
    try:
        record = json.loads(text.rstrip("\r\n"))  # the line's end is not part of it: columns stay on it
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc.msg}: column {exc.colno}") from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, found {type(record).__name__}")
    has_query, has_messages = "query" in record, "messages" in record
    if has_query == has_messages:
        raise DataError("expected exactly one of 'query' (a string) or 'messages' (a list), found "
                        + ("both" if has_query else f"neither (keys: {', '.join(record) or 'none'})"))  # fmt: skip
    if has_query:
        query = record["query"]
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"'query': expected a non-empty string, found {query!r}")
        sys_text = record.get("system", system)
        messages = [{"role": "system", "content": sys_text}] if sys_text else []
        messages.append({"role": "user", "content": query})
    else:
        messages = _check_messages(record["messages"])
    response_format = record.get("response_format")
    if response_format is not None and not (isinstance(response_format, dict) and "type" in response_format):
        raise DataError(f"'response_format': expected an object with a 'type', found {response_format!r}")
    rid = record.get("id", f"line-{line}")
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise DataError(f"'id': expected a string or an integer, found {rid!r}")
    model = record.get("model")
    if model is not None and not isinstance(model, str):
        raise DataError(f"'model': expected a model or adapter name, found {model!r}")
    request = ChatRequest(
        messages=messages,
        model=model,
        temperature=_number(record, "temperature", temperature, float),
        max_tokens=_number(record, "max_tokens", max_tokens, int),
        response_format=response_format,
    )
    return Query(line=line, id=str(rid), record=record, request=request)


def _number(record: dict[str, Any], key: str, default: float, kind: type) -> Any:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
        raise DataError(f"{key!r}: expected {'an integer' if kind is int else 'a number'}, found {value!r}")
    return kind(value)


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"'messages': expected a non-empty list, found {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"'messages[{i}]': expected {{'role': system|user|assistant, 'content': str}}")
    if messages[-1]["role"] == "assistant":
        raise DataError("'messages': the last turn is the assistant's; nothing left to answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def finished_ids(output: Path) -> set[str]:
    """Ids already answered in `output`. A last line cut short by a kill is removed first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last line (the previous run was stopped mid-write)", output)
        with output.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done = set()
    for n, raw in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            done.add(str(json.loads(raw)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                f"{output}:{n}: not a medtune infer result (expected JSON with an 'id'); "
                "choose another --output or remove the file"
            ) from None
    return done


def _append(f: Any, record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_inference(
    backend: Backend,
    input_path: str | Path,
    output_path: str | Path,
    *,
    batch_size: int = 8,
    system: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[], None] | None = None,
) -> InferSummary:
    """Answer every query of `input_path` not yet in `output_path`, `batch_size` in flight at once.

    `on_start(n_to_do)` is called once the input is read, `on_result()` after each line (answered
    or refused), for progress bars. Bad lines are logged and listed in the summary."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise DataError(f"--input {input_path}: file not found")
    if output_path.resolve() == input_path.resolve():
        raise DataError(f"--output {output_path}: the same file as --input")
    summary = InferSummary()
    done = finished_ids(output_path)
    todo: list[tuple[Query, ChatRequest]] = []
    seen: dict[str, int] = {}
    with input_path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            summary.total += 1
            try:
                q = parse_query(text, n, system=system, temperature=temperature, max_tokens=max_tokens)
            except DataError as exc:
                summary.bad.append(BadLine(n, str(exc)))
                continue
            if q.id in seen:
                summary.bad.append(BadLine(n, f"duplicate id {q.id!r} (first on line {seen[q.id]})"))
                continue
            seen[q.id] = n
            if q.id in done:
                summary.skipped_done += 1
            else:
                todo.append((q, q.request))
    for bad in summary.bad:
        log.warning("%s:%d: skipped: %s", input_path, bad.line, bad.reason)
    if on_start is not None:
        on_start(len(todo))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("a", encoding="utf-8") as out:
        for q, outcome in backend.complete_many(todo, concurrency=batch_size):
            if isinstance(outcome, ChatResult):
                _append(out, _result_record(q, outcome))
                summary.answered += 1
            else:
                summary.bad.append(BadLine(q.line, f"refused: {outcome}"))
                log.warning("%s:%d: skipped: %s", input_path, q.line, outcome)
            if on_result is not None:
                on_result()
    summary.bad.sort(key=lambda b: b.line)
    return summary


def _result_record(q: Query, result: ChatResult) -> dict[str, Any]:
    return {
        **q.record,
        "id": q.record.get("id", q.id),
        "line": q.line,
        "response": result.text,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
    }
