"""Interactive terminal chat with a local model or a running server, answers streamed as decoded.

    medtune chat --model runs/aria/dpo [--adapter derm=adapters/derm] [--system "..."]
    medtune chat --endpoint http://127.0.0.1:8001 --model aria-ft --api-key ...

The conversation is kept and sent whole with every turn. Commands (type /help in the chat):
/reset clears the history, /system TEXT sets the system prompt, /schema FILE answers in JSON that
follows a JSON schema (constrained decoding; /schema off goes back to free text), /model NAME
switches adapter or served model, /history shows the conversation, /exit leaves (so does Ctrl-D).
Ctrl-C stops an answer being written.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jsonschema

from medtune.errors import DataError, MedtuneError
from medtune.ui.backends import Backend, ChatRequest

PROMPT = "you> "
ANSWER = "assistant> "
HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system [TEXT]  show or set the system prompt (/system off removes it)
  /schema [FILE]  answer as JSON following the schema in FILE (/schema off: free text)
  /model [NAME]   show the models, or switch to NAME (an adapter or served model)
  /history        show the conversation so far
  /exit           leave (Ctrl-D too)"""


def load_schema(path: str | Path) -> dict[str, Any]:
    """A JSON schema file -> the schema, checked against the JSON-schema meta-schema."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: schema file not found")
    try:
        schema = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(schema, dict):
        raise DataError(f"{p}: a JSON schema is an object, found {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(k) for k in exc.absolute_path) or "(root)"
        raise DataError(f"{p}: not a valid JSON schema at {where}: {exc.message}") from None
    return schema


@dataclass
class ChatSession:
    """The conversation state and the slash commands; `turn` asks the backend for one answer."""

    backend: Backend
    system: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512
    model: str | None = None
    schema: dict[str, Any] | None = None
    schema_name: str = ""
    history: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def request(self) -> ChatRequest:
        response_format = None
        if self.schema is not None:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": self.schema_name or "answer", "schema": self.schema, "strict": True},
            }
        return ChatRequest(
            messages=self.messages(),
            model=self.model,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            response_format=response_format,
        )

    def command(self, line: str) -> str | None:
        """Run a slash command; return the text to show, or None to leave the chat."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return None
        if name == "/reset":
            self.history.clear()
            return "(conversation cleared)"
        if name == "/system":
            if not arg:
                return f"system prompt: {self.system!r}" if self.system else "(no system prompt)"
            self.system = None if arg == "off" else arg
            return "(system prompt removed)" if arg == "off" else "(system prompt set)"
        if name == "/schema":
            if not arg:
                return f"structured mode: {self.schema_name}" if self.schema else "(free text mode)"
            if arg == "off":
                self.schema = None
                return "(free text mode)"
            self.schema = load_schema(arg)
            self.schema_name = Path(arg).stem
            return f"(structured mode: answers follow {arg})"
        if name == "/model":
            names = self.backend.models()
            if not arg:
                current = self.model or self.backend.default_model
                return "\n".join(f"{'*' if n == current else ' '} {n}" for n in names)
            if arg not in names:
                return f"unknown model {arg!r}; available: {', '.join(names)}"
            self.model = arg
            return f"(now answering with {arg})"
        if name == "/history":
            if not self.history:
                return "(empty conversation)"
            return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages())
        if name == "/help":
            return HELP
        return f"unknown command {name}; type /help"


def run_chat(
    session: ChatSession,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> int:
    """The read-answer loop. Returns the exit status (0)."""

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    say(
        f"medtune chat with {session.model or session.backend.default_model}; /help for commands, /exit to leave"
    )
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            say("")
            return 0
        except KeyboardInterrupt:
            say("")
            continue
        if not line.strip():
            continue
        if line.lstrip().startswith("/"):
            try:
                shown = session.command(line)
            except MedtuneError as exc:
                shown = f"error: {exc}"
            if shown is None:
                return 0
            say(shown)
            continue
        session.history.append({"role": "user", "content": line})
        out.write(ANSWER)
        out.flush()
        pieces: list[str] = []
        stream = session.backend.stream(session.request())
        try:
            for piece in stream:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            say(" [stopped]")
            session.history.pop()
            continue
        except MedtuneError as exc:
            say(f"\nerror: {exc}")
            session.history.pop()
            continue
        say("")
        session.history.append({"role": "assistant", "content": "".join(pieces)})


def enable_line_editing() -> None:
    """Arrow keys and input history in `input()` where the platform has readline."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it is what turns line editing on)
