"""What every stage shares: the warning when max_length cuts examples."""

from __future__ import annotations

from datasets import Dataset

from medtune.train.common import warn_if_truncated


def test_dpo_pairs_longer_than_max_length_are_counted(caplog):
    ds = Dataset.from_dict(
        {
            "prompt_ids": [[1] * 10, [1] * 10, [1] * 4],
            "chosen_ids": [[2] * 5, [2] * 2, [2] * 2],
            "rejected_ids": [[3] * 2, [3] * 7, [3] * 2],
        }
    )
    with caplog.at_level("WARNING", logger="medtune.train.common"):
        assert warn_if_truncated(ds, 16, "dpo") == 1  # 10+7 > 16; 10+5 and 4+2 fit
    assert "1 of 3 examples are longer than train.dpo.max_length=16" in caplog.text
    assert warn_if_truncated(ds, 17, "dpo") == 0
    assert warn_if_truncated(ds, None, "dpo") == 0


def test_sft_rows_at_the_limit_count_as_cut():
    ds = Dataset.from_dict({"input_ids": [[1] * 8, [1] * 5]})
    assert warn_if_truncated(ds, 8, "sft") == 1
    assert warn_if_truncated(ds, 8, "sft", n_given=3) == 2  # one more was dropped by TRL
    assert warn_if_truncated(Dataset.from_dict({"text": ["a"]}), 8, "pt") == 0
