"""Dataset statistics: counts, length distributions (characters, and tokens with a tokenizer), labels.

    stats = dataset_stats(load_records("train.jsonl"), tokenizer=None)
    stats["chars"]["response"]["p50"], stats["labels"]["Tendinite Achille"]["share"]

For conversations, `prompt` is every turn before the last assistant turn and `response` that last
turn; for preference pairs, `prompt`, `chosen` and `rejected`; for raw text, `text`. Token counts
use the chat template when the tokenizer has one (what training will see), else the plain texts.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from medtune.data.formats import record_kind

PERCENTILES = (50, 90, 99)


def length_summary(lengths: list[int]) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max of a list of lengths (zeros when empty)."""
    if not lengths:
        return {"min": 0, "mean": 0.0, **{f"p{q}": 0 for q in PERCENTILES}, "max": 0}
    arr = np.asarray(lengths)
    summary: dict[str, float] = {"min": int(arr.min()), "mean": round(float(arr.mean()), 1)}
    for q in PERCENTILES:
        summary[f"p{q}"] = int(np.percentile(arr, q, method="inverted_cdf"))
    summary["max"] = int(arr.max())
    return summary


def _parts(record: dict[str, Any], kind: str) -> dict[str, str]:
    """The texts whose lengths are reported, by part name."""
    if kind == "text":
        return {"text": record["text"]}
    if kind == "preference":
        return {
            side: "\n".join(m["content"] for m in record[side]) for side in ("prompt", "chosen", "rejected")
        }
    messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return {
        "prompt": "\n".join(m["content"] for m in messages[:last]),
        "response": messages[last]["content"] if last < len(messages) else "",
    }


def _token_count(record: dict[str, Any], kind: str, tokenizer: Any) -> int:
    if kind == "text":
        text = record["text"]
    elif getattr(tokenizer, "chat_template", None):
        from medtune.data.templates import render_chat

        messages = record["messages"] if kind == "conversation" else record["prompt"] + record["chosen"]
        text = render_chat(messages, tokenizer)
    else:
        text = "\n".join(_parts(record, kind).values())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_balance(records: list[dict[str, Any]], key: str = "label") -> dict[str, dict[str, float]]:
    """count and share of each value of `key`, most frequent first ({} when no record has it)."""
    counts = Counter(str(r[key]) for r in records if key in r)
    total = sum(counts.values())
    return {label: {"count": n, "share": round(n / total, 4)} for label, n in counts.most_common()}


def dataset_stats(
    records: list[dict[str, Any]], tokenizer: Any = None, label_key: str = "label"
) -> dict[str, Any]:
    """Statistics of canonical records (see the module docstring for the parts measured)."""
    if not records:
        return {"records": 0}
    kind = record_kind(records[0])
    parts = [_parts(r, kind) for r in records]
    stats: dict[str, Any] = {"records": len(records), "kind": kind}
    if kind == "conversation":
        turns = [len(r["messages"]) for r in records]
        stats["turns"] = length_summary(turns)
        stats["with_system_prompt"] = sum(r["messages"][0]["role"] == "system" for r in records)
    stats["chars"] = {name: length_summary([len(p[name]) for p in parts]) for name in parts[0]}
    if tokenizer is not None:
        stats["tokens"] = length_summary([_token_count(r, kind, tokenizer) for r in records])
    seen: set[str] = set()
    duplicates = 0
    for p in parts:
        key = json.dumps(p, sort_keys=True, ensure_ascii=False)
        duplicates += key in seen
        seen.add(key)
    stats["duplicates"] = duplicates
    labels = label_balance(records, label_key)
    if labels:
        stats["labels"] = labels
    return stats
