"""Read dataset files row by row, keeping where each row came from.

    for row in read_rows("train.jsonl"):
        row.line, row.value, row.error   # value is the parsed object; error a reason when unparsable

Supported: `.jsonl` (one JSON value a line), `.json` (an array of objects, one object, or JSON lines
saved with a .json name), `.csv` (header row; cells holding JSON lists are decoded), `.parquet`, and
`.txt` (one document a line, read as `{"text": line}`). A directory reads every supported file in it,
sorted by name. `line` is the 1-based line in text files and the 1-based row number in Parquet files.
A row that cannot be parsed is returned with an `error` instead of being dropped, so validation can
report every bad line; blank lines are not rows.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune import io as atomic
from medtune.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# CSV cells with these column names hold nested lists (a conversation) serialised as JSON.
_JSON_COLUMNS = {
    "messages",
    "conversations",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "history",
    "input",
}


@dataclass
class Row:
    """One row of a file: its origin, its parsed value, or the reason it could not be parsed."""

    path: Path
    line: int
    value: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_rows(path: str | Path) -> Iterator[Row]:
    """Yield every row of a file (or of every supported file of a directory), bad ones included."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in SUFFIXES and not f.name.startswith("."))
        if not files:
            raise DataError(f"{p}: no dataset file in this folder (expected {', '.join(SUFFIXES)})")
        for f in files:
            yield from read_rows(f)
        return
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    suffix = p.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix == ".txt":
        yield from _read_txt(p)
    elif suffix in readers:
        yield from readers[suffix](p)
    else:
        raise DataError(f"{p}: unsupported file type {suffix!r} (expected {', '.join(SUFFIXES)})")


def _text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_txt(p: Path) -> Iterator[Row]:
    for number, line in enumerate(_text(p).splitlines(), start=1):
        if line.strip():
            yield Row(p, number, {"text": line})


def _parse_lines(p: Path, text: str, first_line: int = 1) -> Iterator[Row]:
    for number, line in enumerate(text.splitlines(), start=first_line):
        if not line.strip():
            continue
        try:
            yield Row(p, number, json.loads(line))
        except json.JSONDecodeError as exc:
            yield Row(p, number, error=f"bad JSON: {exc.msg} (column {exc.colno})")


def _read_jsonl(p: Path) -> Iterator[Row]:
    yield from _parse_lines(p, _text(p))


def _read_json(p: Path) -> Iterator[Row]:
    """A JSON array is read element by element so each record keeps the line where it starts."""
    text = _text(p)
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if pos == len(text):
        return
    if text[pos] != "[":
        # One object, or JSON lines saved under a .json name.
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield Row(p, exc.lineno, error=f"bad JSON: {exc.msg} (column {exc.colno})")
            return
        if _skip_ws(text, end) == len(text):
            yield Row(p, text.count("\n", 0, pos) + 1, value)
        else:
            yield from _parse_lines(p, text)
        return
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Inside one array a syntax error leaves no safe place to resume: report it and stop.
            yield Row(
                p, exc.lineno, error=f"bad JSON: {exc.msg} (column {exc.colno}); rest of the file not read"
            )
            return
        yield Row(p, line, value)
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            line = text.count("\n", 0, pos) + 1
            yield Row(p, line, error="bad JSON: expected ',' or ']' after an array element")
            return
    yield Row(p, text.count("\n") + 1, error="bad JSON: the array is not closed with ']'")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(p: Path) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        while True:
            start = reader.line_num + 1  # a quoted cell may span lines: the row starts here
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Row(p, start, error=f"bad CSV: {exc}")
                return
            if not cells:
                continue
            if len(cells) != len(header):
                yield Row(p, start, error=f"CSV row has {len(cells)} cells, the header has {len(header)}")
                continue
            yield _csv_row(p, start, dict(zip(header, cells, strict=True)))


def _csv_row(p: Path, line: int, raw: dict[str, str]) -> Row:
    record: dict[str, Any] = {}
    for key, cell in raw.items():
        if key in _JSON_COLUMNS and cell.lstrip().startswith("["):
            try:
                record[key] = json.loads(cell)
            except json.JSONDecodeError as exc:
                return Row(p, line, error=f"column {key!r}: bad JSON list: {exc.msg} (column {exc.colno})")
        else:
            record[key] = cell
    return Row(p, line, record)


def _read_parquet(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(f"{p}: cannot read Parquet: {exc}") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield Row(p, number, record)


def write_rows(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows atomically in the file type named by the suffix (the inverse of `read_rows`)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return atomic.write_jsonl(p, rows)
    if suffix == ".json":
        return atomic.write_json(p, rows)
    if suffix == ".txt":
        return atomic.write_text(p, "".join(_txt_line(p, i, r) for i, r in enumerate(rows, start=1)))
    if suffix == ".csv":
        return _write_csv(p, rows)
    if suffix == ".parquet":
        return _write_parquet(p, rows)
    raise DataError(f"{p}: unsupported output type {suffix!r} (expected {', '.join(SUFFIXES)})")


def _txt_line(p: Path, i: int, row: dict[str, Any]) -> str:
    text = row.get("text")
    if set(row) != {"text"} or not isinstance(text, str):
        raise DataError(f"{p}: record {i}: a .txt file holds raw text only (one 'text' per line)")
    if "\n" in text or "\r" in text or not text.strip():
        raise DataError(f"{p}: record {i}: text is empty or spans several lines; write .jsonl instead")
    return text + "\n"


def _write_csv(p: Path, rows: list[dict[str, Any]]) -> Path:
    import io as _io

    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {k: json.dumps(v, ensure_ascii=False) if isinstance(v, list | dict) else v for k, v in r.items()}
        )
    return atomic.write_text(p, buffer.getvalue())


def _write_parquet(p: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # from_pylist takes its columns from the first row: give every row every column (null if absent).
        columns = list(dict.fromkeys(k for r in rows for k in r))
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(
            f"{p}: these records do not fit one Parquet schema ({exc}); write .jsonl instead"
        ) from None
    with atomic.atomic_path(p) as tmp:
        pq.write_table(table, tmp)
    return p
