"""What makes a record trainable: each rule reported with the field as the user's file spells it."""

import pytest

from medtune.data.files import load_records, read_file
from medtune.data.io import write_rows
from medtune.errors import DataError

USER, ANSWER = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}


def problems_of(tmp_path, rows, fmt="auto", **kw):
    report = read_file(write_rows(tmp_path / "d.jsonl", rows), fmt, **kw)
    return [(p.line, p.reason) for p in report.problems]


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "messages: no turns"),
        ([USER, {"role": "assistant", "content": " \n"}], "messages[1]: empty assistant turn"),
        (
            [USER, ANSWER, ANSWER],
            "messages[2]: wrong role order: 'assistant' after 'assistant' (expected 'user')",
        ),
        ([ANSWER], "messages[0]: wrong role order: 'assistant' as the first turn"),
        (
            [USER, {"role": "system", "content": "S"}, ANSWER],
            "messages[1]: wrong role order: a system turn may only come first",
        ),
        ([{"role": "system", "content": "S"}], "messages: no user turn"),
        ([USER], "messages[0]: the conversation must end with an assistant turn"),
        ([{"role": "tool", "content": "x"}, ANSWER], "messages[0]: unknown role 'tool'"),
        ([{"role": "user", "content": 3}, ANSWER], "messages[0]: content must be a string, found int"),
        ([{"content": "x"}, ANSWER], "messages[0]: missing field 'role'"),
    ],
)
def test_conversation_rules(tmp_path, messages, reason):
    ((line, found),) = problems_of(tmp_path, [{"messages": messages}], "messages")
    assert line == 1
    assert found.startswith(reason)


def test_sharegpt_problems_name_the_conversations_field(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}]
    assert problems_of(tmp_path, rows) == [(1, "conversations[1]: empty assistant turn")]
    rows = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}]
    assert "conversations[1]: unknown role 'bot'" in problems_of(tmp_path, rows)[0][1]


def test_alpaca_problems_name_alpaca_fields(tmp_path):
    assert problems_of(tmp_path, [{"instruction": "Q", "input": "", "output": ""}]) == [
        (1, "output: empty assistant turn")
    ]
    assert problems_of(tmp_path, [{"instruction": "Q", "output": ["A"]}]) == [
        (1, "field 'output': expected a string, found a list")
    ]


def test_preference_rules(tmp_path):
    rows = [
        {"prompt": "Q", "chosen": "same", "rejected": " same "},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": [USER, ANSWER], "chosen": "a", "rejected": "b"},
        {"prompt": "Q", "chosen": [USER], "rejected": "b"},
        {"prompt": "Q", "chosen": "a", "rejected": "b"},
    ]
    found = dict(problems_of(tmp_path, rows))
    assert found[1] == "chosen == rejected: the pair teaches nothing"
    assert found[2] == "prompt: empty user turn"
    assert found[3] == "prompt[1]: the prompt must end with a user turn"
    assert found[4] == "chosen[0]: expected an assistant turn, found 'user'"
    assert 5 not in found


def test_medicalgpt_preference_names_its_fields(tmp_path):
    rows = [{"system": "", "question": "Q", "response_chosen": "A", "response_rejected": ""}]
    assert problems_of(tmp_path, rows) == [(1, "response_rejected: empty answer")]


def test_test_cases_and_prompts_may_end_on_a_user_turn(tmp_path):
    test_case = {"messages": [{"role": "system", "content": "S"}, USER], "reference": "A", "label": "x"}
    assert problems_of(tmp_path, [test_case]) == []
    assert problems_of(tmp_path, [{"messages": [USER]}], prompt_only=True) == []


def test_valid_records_are_kept_beside_bad_ones(tmp_path):
    rows = [
        {"messages": [USER, ANSWER], "label": "a"},
        {"messages": [USER]},
        {"messages": [USER, ANSWER], "label": "b"},
    ]
    report = read_file(write_rows(tmp_path / "d.jsonl", rows))
    assert [r["label"] for r in report.records] == ["a", "b"]
    assert report.lines == [1, 3]
    assert report.total == 3


def test_load_records_lists_every_bad_line(tmp_path):
    path = write_rows(
        tmp_path / "d.jsonl", [{"messages": [USER]}, {"messages": [USER, ANSWER]}, {"messages": []}]
    )
    with pytest.raises(DataError) as err:
        load_records(path)
    assert f"{path}:1: messages[0]" in str(err.value)
    assert f"{path}:3: messages: no turns" in str(err.value)
    assert "2 bad record(s) of 3" in str(err.value)


def test_load_records_checks_the_kind(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"text": "doc"}])
    with pytest.raises(DataError, match="expected conversation records, found text"):
        load_records(path, kind="conversation")
