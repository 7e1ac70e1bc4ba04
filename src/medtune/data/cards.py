"""Dataset cards: a README.md with the Hugging Face YAML header, sizes, fields, labels and provenance.

    text = dataset_card({"train": read_file("train.jsonl")}, out="data/README.md", name="aria-sft")
    write_dataset_card(["data/"], "data/README.md")       # a folder: one split per file (train, validation, test)

The YAML header (license, language, task_categories, size_categories, configs) is built with
`huggingface_hub.DatasetCardData`, so the Hub reads the card and loads the files as splits.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData

from medtune import __version__
from medtune import io as atomic
from medtune.data.files import ValidationReport, read_file
from medtune.data.formats import convert_records
from medtune.data.io import SUFFIXES
from medtune.data.stats import dataset_stats
from medtune.errors import DataError

_SIZE_BOUNDS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
_KIND_TAGS = {"conversation": "sft", "preference": "dpo", "text": "pretraining"}


def size_category(n: int) -> str:
    """The Hub's size bucket for n records."""
    return next(
        (label for bound, label in _SIZE_BOUNDS if n < bound), "1M<n<10M" if n < 10_000_000 else "n>10M"
    )


def _split_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return _SPLIT_ALIASES.get(stem, stem)


def collect_splits(paths: list[str | Path], format: str = "auto") -> dict[str, ValidationReport]:
    """Read the dataset files to describe: a file is one split named after it (`train.jsonl` ->
    train; a lone file of any name -> train); a folder contributes each dataset file inside."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(
                f for f in p.iterdir() if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")
            )
        else:
            files.append(p)
    if not files:
        raise DataError(f"no dataset file found in {', '.join(map(str, paths))}")
    names = [_split_name(f) for f in files]
    if len(files) == 1 and names[0] not in ("train", "validation", "test"):
        names = ["train"]
    if len(set(names)) != len(names):
        raise DataError(
            f"two files map to the same split name: {dict(zip(map(str, files), names, strict=True))}"
        )
    order = {"train": 0, "validation": 1, "test": 2}
    pairs = sorted(zip(names, files, strict=True), key=lambda nf: (order.get(nf[0], 3), nf[0]))
    return {name: read_file(f, format) for name, f in pairs}


def _fields(report: ValidationReport) -> list[tuple[str, str]]:
    """Field name -> JSON type, as the file spells them."""
    rows = convert_records(report.records[:100], report.format)
    fields: dict[str, str] = {}
    for row in rows:
        for key, value in row.items():
            fields.setdefault(key, type(value).__name__.replace("str", "string").replace("dict", "object"))
    return list(fields.items())


def dataset_card(
    splits: dict[str, ValidationReport],
    out: str | Path,
    *,
    name: str | None = None,
    license: str = "apache-2.0",
    language: list[str] | None = None,
    task_categories: list[str] | None = None,
    provenance: str | None = None,
) -> str:
    """The README.md text for these splits; data file paths are written relative to `out`."""
    bad = {s: r for s, r in splits.items() if not r.ok}
    if bad:
        details = "; ".join(f"{r.path}: {len(r.problems)} bad record(s)" for r in bad.values())
        raise DataError(f"fix the data before writing its card ({details}; see `medtune data validate`)")
    first = next(iter(splits.values()))
    kinds = {r.kind for r in splits.values()}
    if len(kinds) > 1:
        raise DataError(f"the splits hold different kinds of records: {sorted(kinds)}")
    total = sum(len(r.records) for r in splits.values())
    out_dir = Path(out).resolve().parent
    name = name or out_dir.name
    data = DatasetCardData(
        license=license,
        language=language or ["fr"],
        task_categories=task_categories or ["text-generation"],
        size_categories=[size_category(total)],
        pretty_name=name,
        tags=["medical", "medtune", _KIND_TAGS[first.kind]],
        configs=[
            {
                "config_name": "default",
                "data_files": [
                    {"split": s, "path": Path(os.path.relpath(r.path.resolve(), out_dir)).as_posix()}
                    for s, r in splits.items()
                ],
            }
        ],
    )
    body = _body(splits, name, provenance)
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _body(splits: dict[str, ValidationReport], name: str, provenance: str | None) -> str:
    first = next(iter(splits.values()))
    everything = [rec for r in splits.values() for rec in r.records]
    stats = dataset_stats(everything)
    lines = [
        f"# {name}",
        "",
        f"{first.kind.capitalize()} records in the **{first.format}** format, {len(everything)} in all.",
        "",
        "## Sizes",
        "",
        "| split | records | file |",
        "|---|---:|---|",
        *(f"| {s} | {len(r.records)} | `{r.path.name}` |" for s, r in splits.items()),
        "",
        "## Fields",
        "",
        *(f"- `{key}` ({kind})" for key, kind in _fields(first)),
        "",
        "## Lengths (characters)",
        "",
        "| part | min | mean | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {part} | {s['min']} | {s['mean']} | {s['p50']} | {s['p90']} | {s['p99']} | {s['max']} |"
            for part, s in stats["chars"].items()
        ),
        "",
    ]
    if "labels" in stats:
        lines += ["## Label balance", "", "| label | records | share |", "|---|---:|---:|"]
        lines += [f"| {label} | {v['count']} | {v['share']:.1%} |" for label, v in stats["labels"].items()]
        lines.append("")
    lines += ["## Provenance", ""]
    if provenance:
        lines += [provenance, ""]
    lines += [
        f"- Files: {', '.join(f'`{r.path.name}` (sha256 `{atomic.sha256_file(r.path)[:16]}…`)' for r in splits.values())}",
        f"- Card written by medtune {__version__} on {dt.date.today().isoformat()}; "
        f"{stats['duplicates']} duplicate record(s).",
        "",
        "## Intended use",
        "",
        "Fine-tuning and evaluating language models for the task above. Medical content: not for clinical "
        "decisions without review by a qualified professional.",
        "",
    ]
    return "\n".join(lines)


def write_dataset_card(
    paths: list[str | Path], out: str | Path, format: str = "auto", **options: Any
) -> Path:
    """Read the files, build their card and write it atomically to `out`."""
    return atomic.write_text(out, dataset_card(collect_splits(paths, format), out, **options))
