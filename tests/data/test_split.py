"""Seeded, stratified train / validation / test splits."""

from collections import Counter

import pytest

from medtune.data.split import split_records
from medtune.errors import DataError


def labelled(counts):
    records = []
    for label, n in counts.items():
        records += [{"text": f"{label} {i}", "label": label} for i in range(n)]
    return records


def test_same_seed_same_split_other_seed_other_split():
    records = labelled({"a": 50, "b": 50})
    first, again = split_records(records, seed=3), split_records(records, seed=3)
    assert first == again
    assert split_records(records, seed=4)["test"] != first["test"]


def test_sizes_are_exact_and_nothing_is_lost_or_duplicated():
    records = labelled({"a": 333, "b": 667})
    parts = split_records(records, val=0.1, test=0.2, seed=0)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [700, 100, 200]
    texts = [r["text"] for part in parts.values() for r in part]
    assert sorted(texts) == sorted(r["text"] for r in records)


def test_each_split_keeps_the_label_proportions():
    records = labelled({"rare": 40, "common": 360})
    parts = split_records(records, val=0.1, test=0.1, seed=1)
    assert Counter(r["label"] for r in parts["validation"]) == {"rare": 4, "common": 36}
    assert Counter(r["label"] for r in parts["test"]) == {"rare": 4, "common": 36}
    assert Counter(r["label"] for r in parts["train"]) == {"rare": 32, "common": 288}


def test_without_labels_it_is_a_plain_seeded_shuffle():
    records = [{"text": str(i)} for i in range(20)]
    parts = split_records(records, val=0.25, test=0.25, seed=0)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [10, 5, 5]


def test_some_records_without_the_label_is_an_error():
    records = [*labelled({"a": 3}), {"text": "no label"}]
    with pytest.raises(DataError, match="record 4 has no 'label'"):
        split_records(records)


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.6, 0.5), (1.0, 0.0)])
def test_bad_fractions_are_refused(val, test):
    with pytest.raises(DataError, match="split fractions"):
        split_records(labelled({"a": 10}), val=val, test=test)
