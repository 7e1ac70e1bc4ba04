"""Checks on canonical records: what makes a conversation, a preference pair or a text trainable.

    problems = check_record(parsed)            # [] when fine, else reasons naming the source fields

Each reason names the field as the user's file spells it (`conversations[2]`, `output`,
`response_rejected`), so it can be found and fixed. Structural problems (missing field, wrong type,
unknown role) are caught earlier, while parsing (`medtune.data.formats`).
"""

from __future__ import annotations

from typing import Any

from medtune.data.formats import Parsed


def _name(names: list[str] | None, key: str, i: int) -> str:
    return names[i] if names and i < len(names) else f"{key}[{i}]"


def check_conversation(
    messages: list[dict[str, Any]],
    names: list[str] | None = None,
    *,
    key: str = "messages",
    prompt_only: bool = False,
) -> list[str]:
    """Problems of one conversation: no turns, empty turns, system not first, roles not alternating,
    no final answer. `prompt_only` accepts a conversation ending on a user turn (a prompt to answer)."""
    if not messages:
        return [f"{key}: no turns"]
    problems = []
    for i, m in enumerate(messages):
        if not m["content"].strip():
            problems.append(f"{_name(names, key, i)}: empty {m['role']} turn")
    expected, order_ok = "user", True
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if i != 0:
                problems.append(
                    f"{_name(names, key, i)}: wrong role order: a system turn may only come first"
                )
            continue
        if role != expected:
            after = f"after {messages[i - 1]['role']!r}" if i else "as the first turn"
            problems.append(
                f"{_name(names, key, i)}: wrong role order: {role!r} {after} (expected {expected!r})"
            )
            order_ok = False
            break
        expected = "assistant" if role == "user" else "user"
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        problems.append(f"{key}: no user turn")
    elif order_ok and not prompt_only and roles[-1] != "assistant":
        problems.append(
            f"{_name(names, key, len(messages) - 1)}: the conversation must end with an assistant turn"
        )
    return problems


def check_preference(parsed: Parsed) -> list[str]:
    r, names = parsed.record, parsed.names
    problems = check_conversation(r["prompt"], names.get("prompt"), key="prompt", prompt_only=True)
    if r["prompt"] and r["prompt"][-1]["role"] != "user":
        problems.append(
            f"{_name(names.get('prompt'), 'prompt', len(r['prompt']) - 1)}: the prompt must end with a user turn"
        )
    for side in ("chosen", "rejected"):
        turns = r[side]
        if not turns:
            problems.append(f"{side}: no answer")
        for i, m in enumerate(turns):
            where = _name(names.get(side), side, i)
            if m["role"] != "assistant":
                problems.append(f"{where}: expected an assistant turn, found {m['role']!r}")
            if not m["content"].strip():
                problems.append(f"{where}: empty answer")
    if r["chosen"] and _texts(r["chosen"]) == _texts(r["rejected"]):
        problems.append("chosen == rejected: the pair teaches nothing")
    return problems


def _texts(turns: list[dict[str, Any]]) -> list[str]:
    return [m["content"].strip() for m in turns]


def check_record(parsed: Parsed, *, prompt_only: bool = False) -> list[str]:
    """Every problem of one parsed record ([] when it is fine to train on)."""
    record = parsed.record
    if parsed.kind == "conversation":
        # A task test case ({"messages": [system, user], "reference": ...}) is a prompt with its answer aside.
        is_prompt = prompt_only or "reference" in record
        return check_conversation(record["messages"], parsed.names.get("messages"), prompt_only=is_prompt)
    if parsed.kind == "preference":
        return check_preference(parsed)
    return [] if record["text"].strip() else ["text: empty document"]
