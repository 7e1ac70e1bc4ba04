"""Seeded train / validation / test splits, stratified by label when the records carry one.

    parts = split_records(records, val=0.1, test=0.1, seed=42)   # {"train": [...], "validation": [...], "test": [...]}

Within each label the records are shuffled with the seed and cut so every split keeps the label
proportions of the whole file; split sizes are rounded once over the whole file (largest remainders),
so `val=0.1` of 1000 records is exactly 100. The same records and seed always give the same splits.
Written by hand rather than with `datasets.Dataset.train_test_split(stratify_by_column=...)`, which
needs a ClassLabel column, splits in two passes for three parts, and refuses classes of one record.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Any

from medtune.errors import DataError

SPLITS = ("train", "validation", "test")


def _largest_remainder(total: int, shares: dict[Any, float]) -> dict[Any, int]:
    """Integer parts of `total` proportional to `shares`, summing exactly to `total`."""
    weight = sum(shares.values()) or 1.0
    exact = {k: total * v / weight for k, v in shares.items()}
    counts = {k: math.floor(x) for k, x in exact.items()}
    leftover = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (exact[k] - counts[k], str(k)), reverse=True)[:leftover]:
        counts[k] += 1
    return counts


def split_records(
    records: list[dict[str, Any]],
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 42,
    stratify_by: str | None = "label",
) -> dict[str, list[dict[str, Any]]]:
    """Split records into train / validation / test: stratified by `stratify_by` when the records
    carry that key, a plain seeded shuffle when none does (DataError when only some do)."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise DataError(
            f"split fractions: expected 0 <= val, test and val + test < 1, found val={val}, test={test}"
        )
    n = len(records)
    sizes = _largest_remainder(n, {"validation": val, "test": test, "train": 1 - val - test})

    groups: dict[str, list[int]] = defaultdict(list)
    has_key = [stratify_by is not None and stratify_by in r for r in records]
    if stratify_by and any(has_key) and not all(has_key):
        missing = has_key.index(False) + 1
        raise DataError(f"stratify by {stratify_by!r}: record {missing} has no {stratify_by!r} (others do)")
    for i, r in enumerate(records):
        groups[str(r[stratify_by]) if has_key[i] else ""].append(i)

    rng = random.Random(seed)
    for key in sorted(groups):
        rng.shuffle(groups[key])
    # How many of each label go to each split: proportional per split, exact per label and per split.
    per_label: dict[str, dict[str, int]] = {key: {} for key in groups}
    remaining = {key: len(idx) for key, idx in groups.items()}
    for split in ("validation", "test"):
        shares = {key: len(idx) for key, idx in groups.items()}
        quota = _largest_remainder(sizes[split], shares)
        for key in groups:
            take = min(quota[key], remaining[key])
            per_label[key][split] = take
            remaining[key] -= take
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for key, idx in groups.items():
        n_val, n_test = per_label[key]["validation"], per_label[key]["test"]
        parts["validation"] += idx[:n_val]
        parts["test"] += idx[n_val : n_val + n_test]
        parts["train"] += idx[n_val + n_test :]
    # Keep the original file order inside each split (stable, easy to diff).
    return {s: [records[i] for i in sorted(parts[s])] for s in SPLITS}
