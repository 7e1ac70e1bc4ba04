"""Reading rows from every supported file type, with the line each row came from."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medtune.data.io import read_rows, write_rows
from medtune.errors import DataError


def test_jsonl_rows_keep_line_numbers_and_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": \n{"text": "c"}\n', encoding="utf-8")
    rows = list(read_rows(path))
    assert [(r.line, r.value) for r in rows if r.error is None] == [(1, {"text": "a"}), (4, {"text": "c"})]
    bad = [r for r in rows if r.error]
    assert [r.line for r in bad] == [3]
    assert bad[0].error.startswith("bad JSON")


def test_json_array_elements_report_their_starting_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {\n    "text": "b"\n  }\n]\n', encoding="utf-8")
    assert [(r.line, r.value["text"]) for r in read_rows(path)] == [(2, "a"), (3, "b")]


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [r.value["text"] for r in read_rows(path)] == ["a", "b"]


def test_csv_decodes_conversation_columns_and_counts_lines_across_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    path.write_text(
        "instruction,input,output\n"
        '"two\nlines",,out\n'
        "short row\n"
        "q,,a\n"
        f'"{json.dumps(messages).replace(chr(34), chr(34) * 2)}",,x\n',
        encoding="utf-8",
    )
    rows = list(read_rows(path))
    assert [r.line for r in rows] == [2, 4, 5, 6]
    assert rows[0].value == {"instruction": "two\nlines", "input": "", "output": "out"}
    assert "1 cells, the header has 3" in rows[1].error
    assert rows[2].value["instruction"] == "q"


def test_csv_json_column_is_decoded(tmp_path):
    path = tmp_path / "d.csv"
    messages = [{"role": "user", "content": "Q, with comma"}, {"role": "assistant", "content": "A"}]
    write_rows(path, [{"messages": messages, "label": "x"}])
    (row,) = read_rows(path)
    assert row.value == {"messages": messages, "label": "x"}


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}]),
        path,
    )
    rows = list(read_rows(path))
    assert [(r.line, r.value["instruction"]) for r in rows] == [(1, "q1"), (2, "q2")]


def test_txt_is_one_document_per_non_blank_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    assert [(r.line, r.value) for r in read_rows(path)] == [
        (1, {"text": "first doc"}),
        (3, {"text": "second doc"}),
    ]


def test_folder_reads_every_dataset_file(tmp_path):
    (tmp_path / "a.txt").write_text("one\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("two\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored\n", encoding="utf-8")
    assert [r.value["text"] for r in read_rows(tmp_path)] == ["one", "two"]


def test_missing_and_unsupported_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_rows(tmp_path / "nope.jsonl"))
    (tmp_path / "d.xml").write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'"):
        list(read_rows(tmp_path / "d.xml"))


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        list(read_rows(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_write_then_read_gives_the_same_rows(tmp_path, suffix):
    rows = [
        {"instruction": "Qu'est-ce que la fièvre ?", "input": "", "output": "Une élévation."},
        {"instruction": "b", "input": "c", "output": "d"},
    ]
    path = write_rows(tmp_path / f"d{suffix}", rows)
    assert [r.value for r in read_rows(path)] == rows


def test_txt_refuses_multi_line_documents(tmp_path):
    with pytest.raises(DataError, match="record 2: text is empty or spans several lines"):
        write_rows(tmp_path / "d.txt", [{"text": "ok"}, {"text": "two\nlines"}])
    assert not (tmp_path / "d.txt").exists()
