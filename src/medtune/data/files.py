"""Dataset files in, canonical records out (and back): the entry points of `medtune.data`.

    report = read_file("train.jsonl")            # every record checked; report.problems lists bad lines
    records = load_records("train.jsonl")        # canonical records, or DataError listing bad lines
    write_records("train.sharegpt.jsonl", records, "sharegpt")

Nothing is dropped silently: a record is either in `report.records` or in `report.problems` with its
file, line and reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.data.formats import (
    KINDS,
    RecordError,
    check_format,
    convert_records,
    detect_format,
    guess_format,
    parse_record,
)
from medtune.data.io import read_rows, write_rows
from medtune.data.validate import check_record
from medtune.errors import DataError

MAX_LISTED = 20


@dataclass
class Problem:
    """One bad record: where it is and why it cannot be used."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ValidationReport:
    """The outcome of reading one dataset file (or folder)."""

    path: Path
    format: str
    records: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # line (or Parquet row) of each record
    problems: list[Problem] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return KINDS.get(self.format, "unknown")

    @property
    def total(self) -> int:
        return len(self.records) + len(self.problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.total == 0:
            return f"{self.path}: no records"
        if self.ok:
            return f"{self.path}: {len(self.records)} valid {self.format} record(s), no problems"
        return (
            f"{self.path}: {len(self.problems)} bad record(s) of {self.total} "
            f"({len(self.records)} valid, format {self.format})"
        )


def read_file(path: str | Path, format: str = "auto", *, prompt_only: bool = False) -> ValidationReport:
    """Read and check every record of a dataset file. `format` is one of `FORMATS` or "auto".
    `prompt_only` accepts conversations that end on a user turn (inputs to answer, not training pairs)."""
    p = Path(path)
    rows = list(read_rows(p))
    values = [r.value for r in rows if r.error is None]
    if format == "auto":
        if p.suffix.lower() == ".txt":
            format = "text"
        elif values:
            format = detect_format(values, str(p))
        else:
            format = "unknown"  # nothing readable: the report lists the unparsable lines, if any
    else:
        check_format(format)
    report = ValidationReport(p, format)
    for row in rows:
        if row.error is not None:
            report.problems.append(Problem(row.path, row.line, row.error))
            continue
        try:
            parsed = parse_record(row.value, format)
            reasons = check_record(parsed, prompt_only=prompt_only)
        except RecordError as exc:
            reasons = [str(exc)]
            looks_like = guess_format(row.value)
            if looks_like and looks_like != format:
                reasons[0] += f" (this record looks like {looks_like}, the file is read as {format})"
        if reasons:
            report.problems.append(Problem(row.path, row.line, "; ".join(reasons)))
        else:
            report.records.append(parsed.record)
            report.lines.append(row.line)
    return report


def format_problems(report: ValidationReport, limit: int | None = MAX_LISTED) -> str:
    """The problems of a report, one per line (at most `limit`, then how many more)."""
    shown = report.problems if limit is None else report.problems[:limit]
    lines = [f"  {p}" for p in shown]
    if len(report.problems) > len(shown):
        lines.append(
            f"  ... and {len(report.problems) - len(shown)} more (run `medtune data validate {report.path}`)"
        )
    return "\n".join(lines)


def load_records(
    path: str | Path, format: str = "auto", *, kind: str | None = None, prompt_only: bool = False
) -> list[dict[str, Any]]:
    """Canonical records of a file; DataError listing the bad lines if any record is invalid.
    `kind` ("conversation", "preference" or "text") rejects a file of another kind up front."""
    report = read_file(path, format, prompt_only=prompt_only)
    if not report.ok:
        raise DataError(f"{report.summary()}\n{format_problems(report)}")
    if kind is not None and report.kind != kind:
        raise DataError(
            f"{report.path}: expected {kind} records, found {report.format} ({report.kind}) records"
        )
    if not report.records:
        raise DataError(f"{report.path}: no records")
    return report.records


def write_records(path: str | Path, records: list[dict[str, Any]], format: str = "messages") -> Path:
    """Write canonical records as `format`, in the file type named by the suffix (.jsonl, .json,
    .csv, .parquet, .txt); atomic: the file is complete or absent."""
    return write_rows(path, convert_records(records, format))
