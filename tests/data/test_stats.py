"""Dataset statistics on a small file whose numbers are known."""

from medtune.data.files import load_records
from medtune.data.io import write_rows
from medtune.data.stats import dataset_stats, length_summary


def conversation(question, answer, label):
    return {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "label": label,
    }


def test_known_file_gives_known_numbers(tmp_path):
    rows = [
        conversation("a" * 10, "b" * 4, "SFP"),
        conversation("a" * 20, "b" * 8, "SFP"),
        conversation("a" * 30, "b" * 12, "Aucune"),
        conversation("a" * 30, "b" * 12, "SFP"),  # a duplicate of the third, but for its label
    ]
    stats = dataset_stats(load_records(write_rows(tmp_path / "d.jsonl", rows)))
    assert stats["records"] == 4
    assert stats["kind"] == "conversation"
    assert stats["with_system_prompt"] == 4
    # prompt = "S\n" + question
    assert stats["chars"]["prompt"]["min"] == 12
    assert stats["chars"]["prompt"]["max"] == 32
    assert stats["chars"]["response"]["mean"] == 9.0
    assert stats["duplicates"] == 1
    assert stats["labels"] == {"SFP": {"count": 3, "share": 0.75}, "Aucune": {"count": 1, "share": 0.25}}
    assert "tokens" not in stats


def test_token_counts_use_the_chat_template(chat_tokenizer):
    tok = chat_tokenizer("chatml")
    record = {
        "messages": [
            {"role": "user", "content": "Céphalée brutale"},
            {"role": "assistant", "content": "Recommandation IRM"},
        ]
    }
    stats = dataset_stats([record], tokenizer=tok)
    # <|im_start|> user Céphalée brutale <|im_end|> <|im_start|> assistant Recommandation IRM <|im_end|>
    assert stats["tokens"]["max"] == 10


def test_preference_and_text_parts():
    pair = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    stats = dataset_stats([pair])
    assert set(stats["chars"]) == {"prompt", "chosen", "rejected"}
    assert stats["chars"]["rejected"]["max"] == 2
    assert dataset_stats([{"text": "abcd"}])["chars"]["text"]["p50"] == 4


def test_length_summary_percentiles():
    summary = length_summary(list(range(1, 101)))
    assert (summary["min"], summary["p50"], summary["p90"], summary["p99"], summary["max"]) == (
        1,
        50,
        90,
        99,
        100,
    )
    assert summary["mean"] == 50.5
