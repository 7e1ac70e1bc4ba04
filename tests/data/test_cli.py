"""`medtune data ...` end to end, through `medtune.cli.main` as a user runs it."""

import json
from typing import Any, ClassVar

import pytest

import medtune.tasks
from medtune.cli import main
from medtune.data.files import load_records
from medtune.data.io import read_rows, write_rows
from medtune.errors import DataError
from medtune.tasks.base import Task

GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
BROKEN_LINES = [
    json.dumps(GOOD),
    '{"messages": [{"role": "user", "content": "Q"}',  # 2: bad JSON
    json.dumps({"message": GOOD["messages"]}),  # 3: missing field
    json.dumps(
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}
    ),  # 4: empty turn
    json.dumps(
        {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}
    ),  # 5: role order
    json.dumps(
        {"messages": [{"role": "doctor", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    ),  # 6: role
    json.dumps(GOOD),
]


def test_validate_reports_five_kinds_of_broken_lines(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(BROKEN_LINES) + "\n", encoding="utf-8")
    assert main(["data", "validate", str(path)]) != 0
    out = capsys.readouterr().out
    assert f"{path}:2: bad JSON" in out
    assert f"{path}:3: missing field 'messages'" in out
    assert f"{path}:4: messages[1]: empty assistant turn" in out
    assert f"{path}:5: messages[0]: wrong role order" in out
    assert f"{path}:6: messages[0]: unknown role 'doctor'" in out
    assert ":1:" not in out and ":7:" not in out
    assert "5 bad record(s) of 7 (2 valid" in out


def test_validate_chosen_equal_rejected(tmp_path, capsys):
    path = write_rows(
        tmp_path / "dpo.jsonl",
        [{"system": "", "question": "Q", "response_chosen": "A", "response_rejected": "A"}],
    )
    assert main(["data", "validate", str(path)]) != 0
    assert f"{path}:1: chosen == rejected" in capsys.readouterr().out


@pytest.mark.parametrize(
    "rows",
    [
        [GOOD],
        [{"instruction": "Q", "input": "", "output": "A"}],
        [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}],
        [{"prompt": "Q", "completion": "A"}],
        [{"system": "", "question": "Q", "response_chosen": "A", "response_rejected": "B"}],
    ],
)
def test_validate_good_files_exit_zero(tmp_path, capsys, rows):
    path = write_rows(tmp_path / "good.jsonl", rows)
    assert main(["data", "validate", str(path)]) == 0
    assert "no problems" in capsys.readouterr().out


def test_validate_with_a_named_format_that_does_not_fit(tmp_path, capsys):
    path = write_rows(tmp_path / "d.jsonl", [GOOD])
    assert main(["data", "validate", str(path), "--format", "alpaca"]) != 0
    assert "missing field 'instruction' (this record looks like messages" in capsys.readouterr().out


def test_unknown_format_exits_2_with_a_message(tmp_path, capsys):
    path = write_rows(tmp_path / "d.jsonl", [GOOD])
    assert main(["data", "validate", str(path), "--format", "chatml"]) == 2
    assert "unknown format 'chatml'" in capsys.readouterr().err


def test_convert_alpaca_csv_to_sharegpt_jsonl(tmp_path, capsys):
    src = write_rows(
        tmp_path / "in.csv", [{"instruction": "Q", "input": "ctx", "output": "A", "system": "S"}]
    )
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), str(out), "--to", "sharegpt"]) == 0
    assert [r.value for r in read_rows(out)] == [
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q\n\nctx"},
                {"from": "gpt", "value": "A"},
            ]
        }
    ]


def test_convert_refuses_a_bad_file_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(BROKEN_LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), str(out), "--to", "sharegpt"]) == 2
    assert "5 bad record(s)" in capsys.readouterr().err
    assert not out.exists()


def test_split_writes_three_stratified_files_in_the_input_format(tmp_path, capsys):
    rows = [
        {"instruction": f"q{i}", "input": "", "output": "a", "label": "rare" if i < 10 else "common"}
        for i in range(100)
    ]
    src = write_rows(tmp_path / "all.jsonl", rows)
    assert main(["data", "split", str(src), "--out", str(tmp_path / "parts"), "--seed", "7"]) == 0
    parts = {
        s: [r.value for r in read_rows(tmp_path / "parts" / f"{s}.jsonl")]
        for s in ("train", "validation", "test")
    }
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert sum(r["label"] == "rare" for r in parts["test"]) == 1
    assert set(parts["train"][0]) == {"instruction", "input", "output", "label"}  # still alpaca
    assert "test: 10 record(s)" in capsys.readouterr().out


def test_stats_json(tmp_path, capsys):
    path = write_rows(tmp_path / "d.jsonl", [{**GOOD, "label": "x"}, {**GOOD, "label": "y"}])
    assert main(["data", "stats", str(path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 2
    assert stats["labels"]["x"]["count"] == 1


def test_stats_with_a_saved_tokenizer_counts_tokens(tmp_path, capsys, chat_tokenizer):
    chat_tokenizer("chatml").save_pretrained(tmp_path / "tok")
    path = write_rows(tmp_path / "d.jsonl", [GOOD])
    assert main(["data", "stats", str(path), "--tokenizer", str(tmp_path / "tok"), "--json"]) == 0
    # <|im_start|> user Q <|im_end|> <|im_start|> assistant A <|im_end|>
    assert json.loads(capsys.readouterr().out)["tokens"]["max"] == 8


def test_card(tmp_path, capsys):
    path = write_rows(tmp_path / "train.jsonl", [GOOD])
    assert main(["data", "card", str(path), "--out", str(tmp_path / "README.md"), "--language", "fr"]) == 0
    assert (tmp_path / "README.md").read_text(encoding="utf-8").startswith("---\n")


class ToyTask(Task):
    """A minimal task: the label is the sign of `x`."""

    name = "toy"
    description = "sign of x"
    system_prompt = "Réponds par le signe."
    labels: ClassVar[list[str]] = ["positif", "négatif"]

    def validate_input(self, record: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(record.get("x"), int | float):
            raise DataError("field 'x': expected a number")
        return record

    def render_prompt(self, record):
        return f"x = {record['x']}"

    def label(self, record):
        return "positif" if record["x"] >= 0 else "négatif"

    def reference_answer(self, record):
        return self.label(record)

    def generate_inputs(self, n, seed):
        return [{"x": (i if i % 2 else -i - 1) + seed} for i in range(n)]

    def generate_sft(self, n, seed):
        return [
            {
                "messages": [*self.messages(r), {"role": "assistant", "content": self.label(r)}],
                "label": self.label(r),
                "input": r,
            }
            for r in self.generate_inputs(n, seed)
        ]

    def generate_dpo(self, n, seed):
        other = {"positif": "négatif", "négatif": "positif"}
        return [
            {
                "prompt": self.messages(r),
                "chosen": [{"role": "assistant", "content": self.label(r)}],
                "rejected": [{"role": "assistant", "content": other[self.label(r)]}],
            }
            for r in self.generate_inputs(n, seed)
        ]

    def score(self, examples, predictions):
        return {
            "accuracy": sum(e["label"] == p for e, p in zip(examples, predictions, strict=True))
            / len(examples)
        }


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(medtune.tasks, "get_task", lambda name: ToyTask())


@pytest.mark.parametrize(("kind", "fmt"), [("sft", "messages"), ("dpo", "preference"), ("test", "messages")])
def test_generate_writes_valid_records(tmp_path, capsys, toy, kind, fmt):
    out = tmp_path / f"{kind}.jsonl"
    assert main(["data", "generate", "toy", "--kind", kind, "-n", "6", "--seed", "3", "--out", str(out)]) == 0
    assert main(["data", "validate", str(out)]) == 0
    records = load_records(out)
    assert len(records) == 6
    if kind == "test":
        assert records[0]["reference"] in ToyTask.labels


def test_generate_is_seeded_and_can_write_another_format(tmp_path, toy):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    main(["data", "generate", "toy", "-n", "4", "--seed", "1", "--out", str(a)])
    main(["data", "generate", "toy", "-n", "4", "--seed", "1", "--out", str(b)])
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.jsonl"
    main(["data", "generate", "toy", "-n", "4", "--seed", "1", "--out", str(c), "--to", "sharegpt"])
    assert "conversations" in next(read_rows(c)).value


def test_render_prints_each_prompt_and_reports_bad_inputs(tmp_path, capsys, toy):
    path = tmp_path / "in.jsonl"
    path.write_text('{"x": 3}\n{"x": "trois"}\n{"x": -2}\n', encoding="utf-8")
    assert main(["data", "render", "toy", str(path)]) == 2
    captured = capsys.readouterr()
    assert "x = 3" in captured.out and "x = -2" in captured.out
    assert f"{path}:2: field 'x'" in captured.err


def test_render_json_gives_the_request_messages(tmp_path, capsys, toy):
    path = write_rows(tmp_path / "in.jsonl", [{"x": 1}])
    assert main(["data", "render", "toy", str(path), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["messages"] == [
        {"role": "system", "content": "Réponds par le signe."},
        {"role": "user", "content": "x = 1"},
    ]


@pytest.mark.parametrize("task", ["aria", "headache"])
def test_generate_and_render_with_the_real_task_packs(tmp_path, capsys, task):
    pytest.importorskip(f"medtune.tasks.{task}")
    sft, cases = tmp_path / "sft.jsonl", tmp_path / "cases.jsonl"
    assert (
        main(["data", "generate", task, "--kind", "sft", "-n", "14", "--seed", "1", "--out", str(sft)]) == 0
    )
    assert main(["data", "validate", str(sft)]) == 0
    write_rows(cases, [r["input"] for r in load_records(sft)[:3]])
    capsys.readouterr()
    assert main(["data", "render", task, str(cases)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"--- {cases}:") == 3
    assert load_records(sft)[0]["messages"][1]["content"] in out


def test_templates_lists_and_prints(capsys):
    assert main(["data", "templates"]) == 0
    assert "chatml" in capsys.readouterr().out.split()
    assert main(["data", "templates", "chatml"]) == 0
    assert "{%- generation %}" in capsys.readouterr().out
