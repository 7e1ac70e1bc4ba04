"""Dataset formats: detect them, read each into the canonical form, write each back.

    fmt = detect_format(values)                       # "alpaca", "sharegpt", ...
    parsed = parse_record(value, fmt)                 # canonical record + the source name of each turn
    rows = convert_records(records, "sharegpt")       # canonical -> ShareGPT dicts

Canonical records (shared with `medtune.tasks` and the trainers):
- conversation: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- preference:   {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
- text:         {"text": str}
Keys a format does not use (`id`, `label`, a task's `input` dict, ...) are carried through unchanged.

Alpaca joins `instruction` and `input` into one user turn ("instruction\\n\\ninput"); to convert back
without loss the canonical record keeps the original `input` string under `alpaca_input`.
Parsing checks structure (fields present, right types, known roles); `medtune.data.validate` then
checks meaning (empty turns, role order, chosen == rejected) and names fields as the source does.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from medtune.errors import DataError

log = logging.getLogger(__name__)

KINDS = {
    "messages": "conversation",
    "sharegpt": "conversation",
    "alpaca": "conversation",
    "prompt_completion": "conversation",
    "preference": "preference",
    "medicalgpt_preference": "preference",
    "text": "text",
}
FORMATS = tuple(KINDS)
ROLES = ("system", "user", "assistant")

# Fields that identify a format, tried in order (the MyMedicalGPT form before generic preference).
_SIGNATURES = (
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("medicalgpt_preference", {"question", "response_chosen"}),
    ("preference", {"chosen", "rejected"}),
    ("alpaca", {"instruction", "output"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("text", {"text"}),
)
# Keys each format consumes; the others pass through.
_OWN_KEYS = {
    "messages": {"messages"},
    "sharegpt": {"conversations", "system"},
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "prompt_completion": {"prompt", "completion"},
    "preference": {"prompt", "chosen", "rejected", "system"},
    "medicalgpt_preference": {"system", "question", "response_chosen", "response_rejected", "history"},
    "text": {"text"},
}
# Keys of each canonical kind that writers translate (everything else passes through).
_CANONICAL_KEYS = {
    "conversation": {"messages", "alpaca_input"},
    "preference": {"prompt", "chosen", "rejected"},
    "text": {"text"},
}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
_SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


class RecordError(ValueError):
    """A record does not fit its format; the message is the reason shown to the user."""


@dataclass
class Parsed:
    """A canonical record plus, for each turn, the field it came from (for error messages)."""

    record: dict[str, Any]
    kind: str
    names: dict[str, list[str]] = field(default_factory=dict)


def check_format(name: str) -> str:
    if name not in KINDS:
        raise DataError(f"unknown format {name!r}; expected one of: auto, {', '.join(FORMATS)}")
    return name


def guess_format(value: Any) -> str | None:
    """The format one record looks like, from its keys; None when nothing matches."""
    if not isinstance(value, dict):
        return None
    for name, keys in _SIGNATURES:
        if keys <= value.keys():
            return name
    return None


def detect_format(values: list[Any], where: str = "") -> str:
    """The format most of the (first) records look like; DataError when none fits."""
    votes = Counter(g for g in map(guess_format, values[:200]) if g)
    if not votes:
        keys = sorted({k for v in values[:50] if isinstance(v, dict) for k in v})
        found = f"keys found: {', '.join(keys)}" if keys else "no JSON objects found"
        raise DataError(
            f"{where}: cannot detect the dataset format ({found}); expected e.g. messages, conversations, "
            "instruction/output, prompt/completion, prompt/chosen/rejected, question/response_chosen, "
            "or text. Name it with --format."
        )
    return votes.most_common(1)[0][0]


# --------------------------------------------------------------------------------------------------
# Reading: source format -> canonical


def parse_record(value: Any, fmt: str) -> Parsed:
    """Turn one source record into its canonical form; RecordError names the bad field."""
    if not isinstance(value, dict):
        raise RecordError(f"expected a JSON object, found {_type(value)}")
    parsed = _PARSERS[fmt](value)
    # Unused keys ride along; a null one (a column this row lacks, in Parquet) is left out.
    extra = {
        k: v for k, v in value.items() if k not in _OWN_KEYS[fmt] and k not in parsed.record and v is not None
    }
    parsed.record.update(extra)
    return parsed


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _field(record: dict[str, Any], key: str, kinds: tuple[type, ...] = (str,), required: bool = True) -> Any:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return None
    value = record[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(_type(k()) for k in kinds)
        raise RecordError(f"field {key!r}: expected {expected}, found {_type(value)}")
    return value


def _turn(role: str, content: Any, name: str) -> dict[str, Any]:
    if not isinstance(content, str):
        raise RecordError(f"{name}: content must be a string, found {_type(content)}")
    return {"role": role, "content": content}


def _message_list(value: list[Any], key: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A list of {role, content} messages; returns the messages and their source names."""
    messages, names = [], []
    for i, m in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(f"{name}: expected a message object, found {_type(m)}")
        if "role" not in m:
            raise RecordError(f"{name}: missing field 'role'")
        if "content" not in m:
            raise RecordError(f"{name}: missing field 'content'")
        if m["role"] not in ROLES:
            raise RecordError(f"{name}: unknown role {m['role']!r} (expected {', '.join(ROLES)})")
        _turn(m["role"], m["content"], name)
        messages.append(dict(m))
        names.append(name)
    return messages, names


def _history(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Alpaca / MyMedicalGPT `history`: earlier [question, answer] pairs."""
    history = _field(record, "history", (list,), required=False) or []
    messages, names = [], []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError(f"history[{i}]: expected a [question, answer] pair, found {_type(pair)}")
        messages += [
            _turn("user", pair[0], f"history[{i}][0]"),
            _turn("assistant", pair[1], f"history[{i}][1]"),
        ]
        names += [f"history[{i}][0]", f"history[{i}][1]"]
    return messages, names


def _system(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    system = _field(record, "system", required=False)
    return ([{"role": "system", "content": system}], ["system"]) if system else ([], [])


def _parse_messages(r: dict[str, Any]) -> Parsed:
    messages, names = _message_list(_field(r, "messages", (list,)), "messages")
    return Parsed({"messages": messages}, "conversation", {"messages": names})


def _parse_sharegpt(r: dict[str, Any]) -> Parsed:
    messages, names = _system(r)
    for i, turn in enumerate(_field(r, "conversations", (list,))):
        name = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{name}: expected a turn object, found {_type(turn)}")
        # Accept role/content spelled the OpenAI way inside ShareGPT turns too.
        role_key, text_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        if role_key not in turn or text_key not in turn:
            raise RecordError(f"{name}: expected 'from' and 'value', found keys {sorted(turn)}")
        source_role = turn[role_key]
        if source_role not in _SHAREGPT_ROLES:
            raise RecordError(
                f"{name}: unknown role {source_role!r} (expected human, gpt, system; or user, assistant)"
            )
        messages.append(_turn(_SHAREGPT_ROLES[source_role], turn[text_key], name))
        names.append(name)
    return Parsed({"messages": messages}, "conversation", {"messages": names})


def _parse_alpaca(r: dict[str, Any]) -> Parsed:
    instruction = _field(r, "instruction")
    output = _field(r, "output")
    extra = _field(r, "input", required=False) or ""
    messages, names = _system(r)
    history, history_names = _history(r)
    user = "\n\n".join(part for part in (instruction, extra) if part)
    messages += [*history, {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    names += [*history_names, "instruction", "output"]
    record: dict[str, Any] = {"messages": messages}
    if extra:
        record["alpaca_input"] = extra
    return Parsed(record, "conversation", {"messages": names})


def _side(value: Any, key: str, role: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A string (one turn of `role`) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}], [key]
    if isinstance(value, list):
        return _message_list(value, key)
    raise RecordError(f"field {key!r}: expected a string or a list of messages, found {_type(value)}")


def _parse_prompt_completion(r: dict[str, Any]) -> Parsed:
    prompt, prompt_names = _side(_field(r, "prompt", (str, list)), "prompt", "user")
    completion, completion_names = _side(_field(r, "completion", (str, list)), "completion", "assistant")
    return Parsed(
        {"messages": prompt + completion}, "conversation", {"messages": prompt_names + completion_names}
    )


def _parse_preference(r: dict[str, Any]) -> Parsed:
    chosen, chosen_names = _side(_field(r, "chosen", (str, list)), "chosen", "assistant")
    rejected, rejected_names = _side(_field(r, "rejected", (str, list)), "rejected", "assistant")
    if r.get("prompt") is not None:
        prompt, prompt_names = _side(_field(r, "prompt", (str, list)), "prompt", "user")
    else:
        # Implicit prompt (TRL): chosen and rejected are whole conversations sharing the prompt turns.
        if not (isinstance(r["chosen"], list) and isinstance(r["rejected"], list)):
            raise RecordError("missing field 'prompt' (needed when chosen/rejected are strings)")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, prompt_names = chosen[:n], chosen_names[:n]
        chosen, chosen_names, rejected, rejected_names = (
            chosen[n:],
            chosen_names[n:],
            rejected[n:],
            rejected_names[n:],
        )
    system, system_names = _system(r)
    if system and not (prompt and prompt[0]["role"] == "system"):
        prompt, prompt_names = system + prompt, system_names + prompt_names
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    names = {"prompt": prompt_names, "chosen": chosen_names, "rejected": rejected_names}
    return Parsed(record, "preference", names)


def _parse_medicalgpt(r: dict[str, Any]) -> Parsed:
    prompt, names = _system(r)
    history, history_names = _history(r)
    prompt += [*history, _turn("user", _field(r, "question"), "question")]
    names += [*history_names, "question"]
    chosen = [_turn("assistant", _field(r, "response_chosen"), "response_chosen")]
    rejected = [_turn("assistant", _field(r, "response_rejected"), "response_rejected")]
    return Parsed(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        "preference",
        {"prompt": names, "chosen": ["response_chosen"], "rejected": ["response_rejected"]},
    )


def _parse_text(r: dict[str, Any]) -> Parsed:
    return Parsed({"text": _field(r, "text")}, "text", {})


_PARSERS = {
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "alpaca": _parse_alpaca,
    "prompt_completion": _parse_prompt_completion,
    "preference": _parse_preference,
    "medicalgpt_preference": _parse_medicalgpt,
    "text": _parse_text,
}


# --------------------------------------------------------------------------------------------------
# Writing: canonical -> target format


def record_kind(record: dict[str, Any]) -> str:
    if "messages" in record:
        return "conversation"
    if "chosen" in record:
        return "preference"
    if "text" in record:
        return "text"
    raise DataError(f"not a canonical record (keys: {', '.join(sorted(record))})")


def convert_records(records: list[dict[str, Any]], to_format: str) -> list[dict[str, Any]]:
    """Canonical records -> records of `to_format`; DataError names the first record that cannot go."""
    check_format(to_format)
    out = []
    clashes: dict[str, int] = {}  # extra keys that a field of the target format overrides
    for i, record in enumerate(records, start=1):
        kind = record_kind(record)
        if kind != KINDS[to_format]:
            raise DataError(f"record {i} is a {kind}; format {to_format!r} holds {KINDS[to_format]}s")
        try:
            converted = _WRITERS[to_format](record)
        except RecordError as exc:
            raise DataError(f"record {i} cannot be written as {to_format}: {exc}") from None
        passthrough = {k: v for k, v in record.items() if k not in _CANONICAL_KEYS[kind]}
        for key in passthrough.keys() & converted.keys():
            clashes[key] = clashes.get(key, 0) + 1
        out.append(converted | {k: v for k, v in passthrough.items() if k not in converted})
    for key, n in clashes.items():
        log.warning(
            "%d record(s): field %r is also a field of the %s format; the extra value is not written",
            n,
            key,
            to_format,
        )
    return out


def _split_system(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return "", messages


def _pairs(messages: list[dict[str, Any]]) -> list[list[str]]:
    """user/assistant alternation -> [[question, answer], ...]."""
    if len(messages) % 2 or any(
        m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(messages)
    ):
        raise RecordError("turns do not alternate user/assistant")
    return [[messages[i]["content"], messages[i + 1]["content"]] for i in range(0, len(messages), 2)]


def _write_messages(r: dict[str, Any]) -> dict[str, Any]:
    out = {"messages": r["messages"]}
    if "alpaca_input" in r:
        out["alpaca_input"] = r["alpaca_input"]
    return out


def _write_sharegpt(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "conversations": [{"from": _SHAREGPT_NAMES[m["role"]], "value": m["content"]} for m in r["messages"]]
    }


def _write_alpaca(r: dict[str, Any]) -> dict[str, Any]:
    system, turns = _split_system(r["messages"])
    if not turns or turns[-1]["role"] != "assistant":
        raise RecordError("alpaca needs a conversation ending with an assistant turn")
    *history, (user, output) = _pairs(turns)
    instruction, extra = user, ""
    original = r.get("alpaca_input")
    if original and user == original:
        instruction, extra = "", original
    elif original and user.endswith("\n\n" + original):
        instruction, extra = user[: -len(original) - 2], original
    out: dict[str, Any] = {"instruction": instruction, "input": extra, "output": output}
    if system:
        out["system"] = system
    if history:
        out["history"] = history
    return out


def _write_prompt_completion(r: dict[str, Any]) -> dict[str, Any]:
    messages = r["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise RecordError("prompt/completion needs a conversation ending with an assistant turn")
    if [m["role"] for m in messages] == ["user", "assistant"]:
        return {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _write_preference(r: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}


def _write_medicalgpt(r: dict[str, Any]) -> dict[str, Any]:
    system, turns = _split_system(r["prompt"])
    if not turns or turns[-1]["role"] != "user":
        raise RecordError("the prompt must end with a user turn")
    history = _pairs(turns[:-1])
    for side in ("chosen", "rejected"):
        if len(r[side]) != 1:
            raise RecordError(f"{side} must be one assistant turn, found {len(r[side])}")
    out: dict[str, Any] = {
        "system": system,
        "question": turns[-1]["content"],
        "response_chosen": r["chosen"][0]["content"],
        "response_rejected": r["rejected"][0]["content"],
    }
    if history:
        out["history"] = history
    return out


def _write_text(r: dict[str, Any]) -> dict[str, Any]:
    return {"text": r["text"]}


_WRITERS = {
    "messages": _write_messages,
    "sharegpt": _write_sharegpt,
    "alpaca": _write_alpaca,
    "prompt_completion": _write_prompt_completion,
    "preference": _write_preference,
    "medicalgpt_preference": _write_medicalgpt,
    "text": _write_text,
}
