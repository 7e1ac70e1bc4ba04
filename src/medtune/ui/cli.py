"""`medtune chat`, `medtune infer` and `medtune ui`: the faces people use, over a local model or a server.

Each takes either `--model PATH` (a model folder, a run folder or a .gguf, loaded in this process,
with `--adapter NAME=PATH` for LoRA adapters) or `--endpoint URL --model NAME` (any
OpenAI-compatible server; the API key from `--api-key` or MEDTUNE_API_KEY).
"""

from __future__ import annotations

import argparse
import logging
import sys

from medtune.errors import ConfigError
from medtune.ui.backends import Backend, open_backend


def _adapters(values: list[str]) -> tuple[dict[str, str], str | None]:
    """`--adapter NAME=PATH` loads an adapter, a bare `--adapter NAME` picks the one to answer with
    (default: the first loaded one). Returns (adapters to load, adapter to use)."""
    adapters: dict[str, str] = {}
    chosen = None
    for value in values:
        name, sep, path = value.partition("=")
        if not name or (sep and not path):
            raise ConfigError(
                f"--adapter {value!r}: expected NAME=PATH (load) or NAME (use), e.g. derm=adapters/derm"
            )
        if sep:
            adapters[name] = path
        else:
            chosen = name
    return adapters, chosen or next(iter(adapters), None)


def _backend(args: argparse.Namespace) -> Backend:
    from medtune.settings import get_settings

    if not args.verbose:  # one INFO line per HTTP request would bury the answers
        for name in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
    api_key = args.api_key if args.api_key is not None else get_settings().api_key
    adapters, _ = _adapters(args.adapter)
    return open_backend(model=args.model, endpoint=args.endpoint, api_key=api_key, adapters=adapters)


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder, run folder or .gguf; with --endpoint: the served name")
    p.add_argument("--endpoint", help="OpenAI-compatible server, e.g. http://127.0.0.1:8001")
    p.add_argument("--api-key", help="API key for --endpoint (default: MEDTUNE_API_KEY)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME[=PATH]",
        help="NAME=PATH loads a LoRA adapter (repeatable); NAME alone answers with that adapter",
    )


def cmd_chat(args: argparse.Namespace) -> int:
    from medtune.ui.chat import ChatSession, enable_line_editing, load_schema, run_chat

    if not args.verbose:  # the terminal is the conversation: warnings and errors only
        logging.getLogger().setLevel(logging.WARNING)
    with _backend(args) as backend:
        session = ChatSession(
            backend,
            system=args.system,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            model=_adapters(args.adapter)[1],
        )
        if args.schema:
            session.schema = load_schema(args.schema)
        enable_line_editing()
        return run_chat(session)


def cmd_infer(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medtune.ui.infer import run_inference

    with (
        _backend(args) as backend,
        Progress(
            TextColumn("infer"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
        ) as progress,
    ):
        task = progress.add_task("infer", total=None)
        summary = run_inference(
            backend,
            args.input,
            args.output,
            batch_size=args.batch_size,
            system=args.system,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            on_start=lambda n: progress.update(task, total=n),
            on_result=lambda: progress.advance(task),
        )
    print(
        f"{args.output}: {summary.answered} answered now, {summary.skipped_done} already done, "
        f"{len(summary.bad)} bad line(s) of {summary.total}"
    )
    for bad in summary.bad:
        print(f"  {args.input}:{bad.line}: {bad.reason}", file=sys.stderr)
    return 1 if summary.bad else 0


def cmd_ui(args: argparse.Namespace) -> int:
    from medtune.ui.web import launch

    with _backend(args) as backend:
        launch(backend, host=args.host, port=args.port, selected=_adapters(args.adapter)[1])
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal (streaming, history, /help)")
    _add_backend_options(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--schema", help="answer as JSON following this JSON-schema file (like /schema)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("infer", help="batch inference: JSONL queries in, JSONL answers out (resumable)")
    _add_backend_options(p)
    p.add_argument(
        "--input", required=True, help="JSONL: one {query|messages, [id], [response_format]} per line"
    )
    p.add_argument("--output", required=True, help="JSONL answers; ids already there are skipped")
    p.add_argument("--batch-size", type=int, default=8, help="requests in flight at once")
    p.add_argument("--system", help="system prompt for lines with a `query`")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("ui", help="web page: ARIA form, headache assistant and chat (Gradio)")
    _add_backend_options(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_ui)
