"""Format detection, reading into canonical records, and lossless conversion back."""

import pytest

from medtune.data.files import load_records, read_file, write_records
from medtune.data.formats import FORMATS, convert_records, detect_format, parse_record
from medtune.data.io import read_rows, write_rows
from medtune.errors import DataError

SYSTEM = "Tu es un assistant médical."
ALPACA = [
    {
        "instruction": "Quels sont les symptômes de l'appendicite ?",
        "input": "",
        "output": "Douleur en fosse iliaque droite.",
    },
    {
        "instruction": "Résume ce cas.",
        "input": "Patient de 40 ans,\n\nfièvre.",
        "output": "Fièvre chez un adulte.",
        "system": SYSTEM,
    },
    {
        "instruction": "Et ensuite ?",
        "input": "",
        "output": "Consulter.",
        "history": [["Bonjour", "Bonjour, je vous écoute."]],
        "id": 7,
    },
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "你好"},
            {"from": "gpt", "value": "你好！有什么我可以帮助你的吗？"},
        ]
    },
    {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": "J'ai mal à la tête."},
            {"from": "gpt", "value": "Depuis quand ?"},
            {"from": "human", "value": "Deux jours."},
            {"from": "gpt", "value": "Pour préciser: fièvre ?"},
        ],
        "category": "neuro",
    },
]
MEDICALGPT = [
    {
        "system": "",
        "question": "什么是人工智能？",
        "response_chosen": "人工智能(AI)是计算机科学的一个分支...",
        "response_rejected": "AI就是机器人。",
    },
    {"system": SYSTEM, "question": "Fièvre ?", "response_chosen": "Oui, 39 °C.", "response_rejected": "Non."},
]


def _roundtrip(tmp_path, rows, fmt, via="messages"):
    src = write_rows(tmp_path / f"src.{fmt}.jsonl", rows)
    canonical = load_records(src)
    mid = write_records(tmp_path / f"mid.{via}.jsonl", canonical, via)
    back = write_records(tmp_path / f"back.{fmt}.jsonl", load_records(mid), fmt)
    return [r.value for r in read_rows(back)]


def test_alpaca_to_messages_to_alpaca_is_lossless(tmp_path):
    assert _roundtrip(tmp_path, ALPACA, "alpaca") == ALPACA


def test_sharegpt_to_messages_to_sharegpt_is_lossless(tmp_path):
    assert _roundtrip(tmp_path, SHAREGPT, "sharegpt") == SHAREGPT


def test_medicalgpt_preference_round_trip_through_trl_preference(tmp_path):
    assert _roundtrip(tmp_path, MEDICALGPT, "medicalgpt_preference", via="preference") == MEDICALGPT


def test_alpaca_reads_as_system_history_user_assistant():
    records = convert_records(load_records_from(ALPACA, "alpaca"), "messages")
    assert records[1]["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Résume ce cas.\n\nPatient de 40 ans,\n\nfièvre."},
        {"role": "assistant", "content": "Fièvre chez un adulte."},
    ]
    assert [m["role"] for m in records[2]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert records[2]["id"] == 7  # unknown keys ride along


def load_records_from(rows, fmt):
    return [parse_record(r, fmt).record for r in rows]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "", "input": "", "output": ""}, "alpaca"),
        ({"prompt": "", "completion": ""}, "prompt_completion"),
        ({"prompt": "", "chosen": "", "rejected": ""}, "preference"),
        (
            {"system": "", "question": "", "response_chosen": "", "response_rejected": ""},
            "medicalgpt_preference",
        ),
        ({"text": ""}, "text"),
    ],
)
def test_each_format_is_detected(row, expected):
    assert detect_format([row]) == expected


def test_undetectable_file_names_the_keys_found(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"query": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"keys found: answer, query.*--format"):
        read_file(path)


def test_prompt_completion_strings_and_conversational_lists(tmp_path):
    rows = [
        {"prompt": "Q", "completion": "A"},
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "completion": [{"role": "assistant", "content": "A"}],
        },
    ]
    path = write_rows(tmp_path / "pc.jsonl", rows)
    records = load_records(path)
    assert records[0]["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert [m["role"] for m in records[1]["messages"]] == ["system", "user", "assistant"]
    assert convert_records(records, "prompt_completion") == rows


def test_preference_strings_lists_and_implicit_prompt_share_one_canonical_form(tmp_path):
    user = {"role": "user", "content": "Q"}
    good, bad = {"role": "assistant", "content": "good"}, {"role": "assistant", "content": "bad"}
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"chosen": [user, good], "rejected": [user, bad]},
    ]
    records = load_records(write_rows(tmp_path / "p.jsonl", rows))
    assert records == [{"prompt": [user], "chosen": [good], "rejected": [bad]}] * 3


def test_text_file_reads_as_raw_documents(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("La migraine est une céphalée primaire.\nLe SFP touche le genou.\n", encoding="utf-8")
    report = read_file(path)
    assert report.format == "text"
    assert [r["text"] for r in report.records] == [
        "La migraine est une céphalée primaire.",
        "Le SFP touche le genou.",
    ]


@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion", "preference", "text"])
def test_converting_to_another_kind_is_refused(fmt):
    records = (
        load_records_from(MEDICALGPT, "medicalgpt_preference") if fmt != "preference" else [{"text": "x"}]
    )
    with pytest.raises(DataError, match="record 1 is a"):
        convert_records(records, fmt)


def test_alpaca_cannot_hold_a_conversation_that_does_not_alternate():
    records = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        }
    ]
    with pytest.raises(DataError, match="record 1 cannot be written as alpaca: turns do not alternate"):
        convert_records(records, "alpaca")


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown format 'alpacca'"):
        convert_records([], "alpacca")
    assert "sharegpt" in FORMATS


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_sharegpt_survives_csv_parquet_and_json(tmp_path, suffix):
    rows = SHAREGPT if suffix != ".csv" else [{**r, "category": "x"} for r in SHAREGPT]  # CSV has no "absent"
    records = load_records(write_rows(tmp_path / "s.jsonl", rows))
    path = write_records(tmp_path / f"s{suffix}", records, "sharegpt")
    assert load_records(path) == records


def test_a_task_input_dict_does_not_overwrite_alpaca_input_and_is_reported_once(caplog):
    record = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "input": {"x": 1},
        "label": "l",
    }
    with caplog.at_level("WARNING"):
        rows = convert_records([record, record], "alpaca")
    assert rows[0] == {"instruction": "Q", "input": "", "output": "A", "label": "l"}
    assert [r.getMessage() for r in caplog.records] == [
        "2 record(s): field 'input' is also a field of the alpaca format; the extra value is not written"
    ]
