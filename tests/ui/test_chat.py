"""`medtune chat` driven through a pseudo-terminal, as a person types into it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pexpect
import pytest

from medtune.errors import DataError
from medtune.ui.chat import load_schema

PROMPT = "you> "


def spawn(*args: str, timeout: float = 180) -> pexpect.spawn:  # generous: a busy 2-core machine
    child = pexpect.spawn(
        sys.executable,
        ["-m", "medtune.cli", "chat", *args],
        encoding="utf-8",
        timeout=timeout,
        dimensions=(40, 200),
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TERM": "dumb"},
    )
    child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Send a line; return everything printed until the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.split("\n", 1)[-1]  # drop the echoed input line


def test_remote_chat_sends_the_whole_history_and_obeys_commands(stub_openai, tmp_path: Path) -> None:
    child = spawn("--endpoint", stub_openai.url, "--model", "stub-model", "--system", "Sois bref.")
    first = say(child, "bonjour")
    assert "assistant> echo 2: bonjour" in first  # system + user
    second = say(child, "et ensuite ?")
    assert "echo 4: et ensuite ?" in second
    sent = stub_openai.requests[-1]["messages"]
    assert sent == [
        {"role": "system", "content": "Sois bref."},
        {"role": "user", "content": "bonjour"},
        {"role": "assistant", "content": "echo 2: bonjour"},
        {"role": "user", "content": "et ensuite ?"},
    ]
    assert stub_openai.requests[-1]["stream"] is True

    assert "bonjour" in say(child, "/history")
    assert "cleared" in say(child, "/reset")
    assert "echo 2: encore" in say(child, "encore")  # system + the new question only

    say(child, "/system off")
    assert "echo 3: sans système" in say(child, "sans système")
    assert stub_openai.requests[-1]["messages"][0] == {"role": "user", "content": "encore"}

    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    (tmp_path / "answer.json").write_text(json.dumps(schema))
    assert "structured mode" in say(child, f"/schema {tmp_path / 'answer.json'}")
    say(child, "en JSON")
    fmt = stub_openai.requests[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema

    assert "stub-adapter" in say(child, "/model")
    say(child, "/model stub-adapter")
    say(child, "via adapter")
    assert stub_openai.requests[-1]["model"] == "stub-adapter"

    assert "unknown command" in say(child, "/nope")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_remote_chat_reports_a_server_error_and_keeps_going(stub_openai) -> None:
    stub_openai.models = ("stub-model", "gone")
    child = spawn("--endpoint", stub_openai.url, "--model", "stub-model")
    stub_openai.models = ("stub-model",)  # the server drops an adapter while we chat
    say(child, "/model gone")
    out = say(child, "bonjour")
    assert "error:" in out and "HTTP 400" in out and "unknown model gone" in out
    say(child, "/model stub-model")
    assert "echo 1: encore" in say(child, "encore")  # the failed turn left no trace in the history
    child.sendeof()
    child.expect(pexpect.EOF)


def test_local_chat_streams_answers_from_the_model_and_keeps_history(tiny_model_dir: Path) -> None:
    child = spawn("--model", str(tiny_model_dir), "--max-tokens", "12", "--temperature", "0")
    first = say(child, "Mesures du coureur : inclinaison_tronc = 9.1")
    assert "assistant> " in first
    answer = first.split("assistant> ", 1)[1].strip()
    history = say(child, "/history")
    assert "user: Mesures du coureur : inclinaison_tronc = 9.1" in history
    assert f"assistant: {answer}" in history
    say(child, "deuxième question")
    assert say(child, "/history").count("user: ") == 2
    say(child, "/reset")
    assert "(empty conversation)" in say(child, "/history")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_local_chat_answers_with_the_chosen_adapter(
    served_model_dir: Path, lora_adapters: dict[str, Path]
) -> None:
    adapters = [f"--adapter={name}={path}" for name, path in lora_adapters.items()]
    child = spawn("--model", str(served_model_dir), *adapters, "--temperature", "0", "--max-tokens", "24")
    question = (
        "Mesures du coureur : adduction_hanche = 11.2. Diagnostic ?"  # what the adapters were trained on
    )
    assert "Avis dermatologique." in say(child, question)  # the first adapter loaded answers first
    listing = say(child, "/model")
    assert "* derm" in listing and "radio" in listing and "base" in listing
    say(child, "/reset")
    say(child, "/model radio")
    assert "Avis radiologique." in say(child, question)
    say(child, "/reset")
    say(child, "/model base")
    assert "Avis" not in say(child, question)
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_chat_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    child = pexpect.spawn(
        sys.executable, ["-m", "medtune.cli", "chat", "--model", str(tmp_path / "nope")], encoding="utf-8"
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "does not exist" in child.before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{nope", "not valid JSON"),
        ("[1, 2]", "a JSON schema is an object"),
        ('{"type": "objekt"}', "not a valid JSON schema"),
    ],
)
def test_bad_schema_files_are_refused_with_the_reason(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "schema.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_schema(path)
