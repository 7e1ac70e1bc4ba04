"""`medtune infer`: bad lines are reported and skipped, answers are kept, a killed job resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from medtune.errors import DataError
from medtune.serve.errors import BadRequest
from medtune.tasks import get_task
from medtune.ui.backends import Backend, ChatRequest, ChatResult
from medtune.ui.infer import finished_ids, run_inference


class EchoBackend(Backend):
    """Answers `answer: <last user message>`; refuses (400) a message saying REFUSE."""

    default_model = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[ChatRequest] = []

    def describe(self) -> str:
        return "echo (test double)"

    def models(self) -> list[str]:
        return ["echo"]

    async def _acomplete(self, req: ChatRequest) -> ChatResult:
        self.seen.append(req)
        last = req.messages[-1]["content"]
        if last == "REFUSE":
            raise BadRequest("the prompt is 9000 tokens, longer than the model's context", param="messages")
        return ChatResult(f"answer: {last}", "stop", 7, 2)

    async def _astream(self, req: ChatRequest) -> AsyncIterator[str]:
        yield (await self._acomplete(req)).text


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines)
    )
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_lines_are_reported_and_the_rest_answered(tmp_path: Path) -> None:
    queries = write_lines(
        tmp_path / "q.jsonl",
        [
            {"id": "a", "query": "première"},
            '{"query": "broken',  # line 2: bad JSON
            {"prompt": "wrong field"},  # line 3
            {"query": "REFUSE"},  # line 4: the model refuses it
            {"messages": [{"role": "user", "content": "seconde"}], "id": 7},
            {"id": "a", "query": "same id again"},  # line 6
            {"messages": [{"role": "robot", "content": "x"}]},  # line 7
            "",
            {"query": "dernière", "system": "Sois bref."},  # line 9
            {"query": "chaud ?", "temperature": "hot"},  # line 10
        ],
    )
    out = tmp_path / "out.jsonl"
    with EchoBackend() as backend:
        summary = run_inference(backend, queries, out, batch_size=2)
    assert summary.total == 9 and summary.answered == 3
    assert [(b.line, b.reason.split(":")[0]) for b in summary.bad] == [
        (2, "not valid JSON"),
        (3, "expected exactly one of 'query' (a string) or 'messages' (a list), found neither (keys"),
        (4, "refused"),
        (6, "duplicate id 'a' (first on line 1)"),
        (7, "'messages[0]'"),
        (10, "'temperature'"),
    ]
    assert summary.bad[0].reason == "not valid JSON: Unterminated string starting at: column 11"
    assert "longer than the model's context" in summary.bad[2].reason
    results = {r["id"]: r for r in read_output(out)}
    assert set(results) == {"a", 7, "line-9"}
    assert results["a"]["response"] == "answer: première" and results["a"]["line"] == 1
    assert results[7]["response"] == "answer: seconde"
    assert results["line-9"]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2}
    sent = {r.messages[-1]["content"]: r for r in backend.seen}
    assert sent["dernière"].messages[0] == {"role": "system", "content": "Sois bref."}


def test_rerun_skips_done_ids_and_drops_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    queries = write_lines(tmp_path / "q.jsonl", [{"query": f"q{i}"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    done = [{"id": "line-1", "response": "old"}, {"id": "line-2", "response": "old"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": "line-3", "respo')
    assert finished_ids(out) == {"line-1", "line-2"}
    assert out.read_text().endswith("}\n")  # the cut line is gone
    with EchoBackend() as backend:
        summary = run_inference(backend, queries, out)
    assert (summary.answered, summary.skipped_done, summary.bad) == (4, 2, [])
    ids = [r["id"] for r in read_output(out)]
    assert sorted(ids) == [f"line-{i}" for i in range(1, 7)]
    assert sorted(r.messages[-1]["content"] for r in backend.seen) == ["q2", "q3", "q4", "q5"]


def test_an_output_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    queries = write_lines(tmp_path / "q.jsonl", [{"query": "x"}])
    out = write_lines(tmp_path / "out.jsonl", [{"text": "someone else's file"}])
    with EchoBackend() as backend, pytest.raises(DataError, match=r"out.jsonl:1: not a medtune infer result"):
        run_inference(backend, queries, out)


def infer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "medtune.cli", "infer", *args]


def test_killed_job_resumes_without_duplicates(stub_openai, tmp_path: Path) -> None:
    n = 30
    lines: list[Any] = [{"id": f"q{i}", "query": f"question {i}"} for i in range(n)]
    lines[12] = "{not json"  # a bad line in the middle
    queries = write_lines(tmp_path / "q.jsonl", lines)
    out = tmp_path / "out.jsonl"
    stub_openai.delay = 0.1
    args = ["--endpoint", stub_openai.url, "--model", "stub-model", "--input", str(queries)]
    job = subprocess.Popen(
        infer_cmd(*args, "--output", str(out), "--batch-size", "2"), stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    first_run = finished_ids(out)
    assert 6 <= len(first_run) < n - 1, "the job should have been stopped mid-way"

    stub_openai.delay = 0.0
    sent_before = len(stub_openai.requests)
    rerun = subprocess.run(
        infer_cmd(*args, "--output", str(out)), capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 1  # finished, but one line was bad
    assert f"{queries}:13: not valid JSON" in rerun.stderr
    assert (
        f"{n - 1 - len(first_run)} answered now, {len(first_run)} already done, 1 bad line(s)" in rerun.stdout
    )
    ids = [r["id"] for r in read_output(out)]
    assert len(ids) == len(set(ids)) == n - 1
    assert set(ids) == {f"q{i}" for i in range(n) if i != 12}
    asked_again = {r["messages"][-1]["content"] for r in stub_openai.requests[sent_before:]}
    assert not asked_again & {f"question {i[1:]}" for i in first_run}  # nothing done is asked twice


def test_remote_infer_sends_each_line_to_its_model(live_server, tmp_path: Path) -> None:
    question = (
        "Mesures du coureur : adduction_hanche = 11.2. Diagnostic ?"  # what the adapters were trained on
    )
    lines = [{"id": name, "query": question, "model": name} for name in ("derm", "radio")]
    queries = write_lines(tmp_path / "q.jsonl", [*lines, {"id": "bad", "query": "x", "model": "nope"}])
    out = tmp_path / "out.jsonl"
    args = ["--endpoint", live_server.base_url, "--api-key", live_server.api_key, "--model", "aria-ft"]
    result = subprocess.run(
        infer_cmd(*args, "--input", str(queries), "--output", str(out), "--max-tokens", "24"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1  # the line naming an unknown model is refused, the others answered
    assert ":3: refused:" in result.stderr and "HTTP 400" in result.stderr
    results = {r["id"]: r["response"] for r in read_output(out)}
    assert set(results) == {"derm", "radio"}
    assert results["derm"].startswith("Avis dermatologique") and results["radio"].startswith(
        "Avis radiologique"
    )


def test_local_model_answers_each_line_and_honours_its_response_format(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    aria = get_task("aria")
    records = aria.generate_inputs(3, seed=5)
    lines = [
        {"id": i, "messages": aria.messages(r), "response_format": aria.response_format()}
        for i, r in enumerate(records)
    ]
    lines.append({"id": "free", "query": "Bonjour", "max_tokens": 5})
    queries = write_lines(tmp_path / "q.jsonl", lines)
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        infer_cmd(
            "--model",
            str(tiny_model_dir),
            "--input",
            str(queries),
            "--output",
            str(out),
            "--max-tokens",
            "200",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    results = {r["id"]: r for r in read_output(out)}
    assert set(results) == {0, 1, 2, "free"}
    for i in range(3):  # an untrained model, but constrained decoding makes every answer schema-valid
        jsonschema.validate(json.loads(results[i]["response"]), aria.output_schema())
    assert results["free"]["usage"]["completion_tokens"] <= 5
