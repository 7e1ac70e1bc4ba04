"""`medtune data ...`: check, convert, split, describe and generate datasets.

    medtune data validate train.jsonl                 # every bad line with file:line and reason
    medtune data convert train.json train.jsonl --to sharegpt
    medtune data split train.jsonl --out data/ --val 0.1 --test 0.1 --seed 42
    medtune data stats train.jsonl --tokenizer runs/aria/model
    medtune data card data/ --out data/README.md
    medtune data generate aria --kind sft -n 1500 --seed 1 --out aria_sft.jsonl
    medtune data render aria cases.jsonl
    medtune data templates [NAME]

Handlers only parse arguments, call `medtune.data` and print results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from medtune.data.formats import FORMATS
from medtune.errors import DataError

_FORMAT_HELP = f"one of: auto, {', '.join(FORMATS)}"


def cmd_validate(args: argparse.Namespace) -> int:
    from medtune.data.files import format_problems, read_file

    report = read_file(args.file, args.format, prompt_only=args.prompts)
    if report.problems:
        print(format_problems(report, limit=None))
    print(report.summary())
    return 0 if report.ok and report.records else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from medtune.data.files import load_records, write_records

    records = load_records(args.input, args.format, prompt_only=True)
    write_records(args.output, records, args.to)
    print(f"wrote {len(records)} record(s) to {args.output} ({args.to})")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from medtune.data.files import read_file, write_records
    from medtune.data.split import split_records
    from medtune.data.stats import label_balance

    report = read_file(args.file, args.format, prompt_only=True)
    if not report.ok:
        from medtune.data.files import format_problems

        raise DataError(f"{report.summary()}\n{format_problems(report)}")
    parts = split_records(report.records, args.val, args.test, args.seed, args.stratify_by or None)
    out = Path(args.out)
    for split, records in parts.items():
        if not records:
            print(f"{split}: 0 records (no file written)")
            continue
        path = write_records(out / f"{split}.jsonl", records, args.to or report.format)
        labels = label_balance(records, args.stratify_by) if args.stratify_by else {}
        shown = ", ".join(f"{k}: {v['count']}" for k, v in labels.items())
        print(f"{split}: {len(records)} record(s) -> {path}" + (f"  [{shown}]" if shown else ""))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from medtune.data.files import load_records
    from medtune.data.stats import dataset_stats

    tokenizer = None
    if args.tokenizer:
        tokenizer = _load_tokenizer(args.tokenizer)
    stats = dataset_stats(load_records(args.file, args.format, prompt_only=True), tokenizer)
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2))
    else:
        _print_stats(args.file, stats)
    return 0


def _load_tokenizer(path: str) -> Any:  # a transformers tokenizer
    from transformers import AutoTokenizer

    from medtune.errors import ModelError

    if not Path(path).exists():
        raise ModelError(f"{path}: tokenizer folder not found (expected a saved model or tokenizer folder)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load a tokenizer: {exc}") from None


def _print_stats(path: str, stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = f"{path}: {stats['records']} {stats.get('kind', '')} record(s), {stats.get('duplicates', 0)} duplicate(s)"
    if "with_system_prompt" in stats:
        head += f", {stats['with_system_prompt']} with a system prompt"
    console.print(head)
    table = Table("length", "min", "mean", "p50", "p90", "p99", "max")
    rows = [(f"{part} (chars)", s) for part, s in stats.get("chars", {}).items()]
    for key, label in (("tokens", "tokens"), ("turns", "turns")):
        if key in stats:
            rows.append((label, stats[key]))
    for label, s in rows:
        table.add_row(label, *(str(s[k]) for k in ("min", "mean", "p50", "p90", "p99", "max")))
    console.print(table)
    if "labels" in stats:
        labels = Table("label", "records", "share")
        for label, v in stats["labels"].items():
            labels.add_row(label, str(v["count"]), f"{v['share']:.1%}")
        console.print(labels)


def cmd_card(args: argparse.Namespace) -> int:
    from medtune.data.cards import write_dataset_card

    path = write_dataset_card(
        args.files,
        args.out,
        args.format,
        name=args.name,
        license=args.license,
        language=args.language,
        task_categories=args.task_category,
        provenance=args.provenance,
    )
    print(f"wrote {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from medtune.data.files import write_records
    from medtune.tasks import get_task

    task = get_task(args.task)
    if args.kind == "sft":
        records = task.generate_sft(args.n, seed=args.seed)
    elif args.kind == "dpo":
        records = task.generate_dpo(args.n, seed=args.seed)
    else:
        records = task.generate_test(args.n, seed=args.seed)
    default = {"sft": "messages", "dpo": "preference", "test": "messages"}[args.kind]
    write_records(args.out, records, args.to or default)
    print(f"wrote {len(records)} {args.task} {args.kind} record(s) to {args.out}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from medtune.data.io import read_rows
    from medtune.tasks import get_task

    task = get_task(args.task)
    problems = []
    for row in read_rows(args.file):
        try:
            if row.error is not None:
                raise DataError(row.error)
            if not isinstance(row.value, dict):
                raise DataError(f"expected a JSON object, found {type(row.value).__name__}")
            record = task.validate_input(row.value)
        except DataError as exc:
            problems.append(f"{row.where}: {exc}")
            continue
        if args.json:
            print(json.dumps({"line": row.line, "messages": task.messages(record)}, ensure_ascii=False))
        else:
            print(f"--- {row.where}")
            print(task.render_prompt(record))
    if problems:
        raise DataError(
            f"{args.file}: {len(problems)} bad input record(s)\n" + "\n".join(f"  {p}" for p in problems)
        )
    return 0


def cmd_templates(args: argparse.Namespace) -> int:
    from medtune.data.templates import get_template, template_names

    if args.name:
        print(get_template(args.name))
    else:
        print("\n".join(template_names()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="check, convert, split, describe and generate datasets")
    cmds = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = cmds.add_parser("validate", help="report every bad record with file:line and reason")
    p.add_argument("file")
    p.add_argument("--format", default="auto", help=_FORMAT_HELP)
    p.add_argument(
        "--prompts", action="store_true", help="records are prompts to answer (may end on a user turn)"
    )
    p.set_defaults(func=cmd_validate)

    p = cmds.add_parser("convert", help="convert between formats")
    p.add_argument("input")
    p.add_argument("output", help="output file; .jsonl, .json, .csv, .parquet or .txt")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--format", default="auto", help=f"input format, {_FORMAT_HELP}")
    p.set_defaults(func=cmd_convert)

    p = cmds.add_parser("split", help="seeded train/validation/test split, stratified by label")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="folder for train.jsonl, validation.jsonl, test.jsonl")
    p.add_argument("--val", type=float, default=0.1)
    p.add_argument("--test", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stratify-by", default="label", help="record key to stratify by ('' for none)")
    p.add_argument("--format", default="auto", help=_FORMAT_HELP)
    p.add_argument("--to", choices=FORMATS, help="output format (default: the input's)")
    p.set_defaults(func=cmd_split)

    p = cmds.add_parser("stats", help="counts, length distribution, label balance")
    p.add_argument("file")
    p.add_argument("--tokenizer", help="tokenizer or model folder, to count tokens")
    p.add_argument("--format", default="auto", help=_FORMAT_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    p = cmds.add_parser("card", help="write a dataset card (README.md with the Hugging Face header)")
    p.add_argument("files", nargs="+", help="dataset files or a folder (one split per file)")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.add_argument("--license", default="apache-2.0")
    p.add_argument("--language", action="append", help="ISO code, repeatable (default: fr)")
    p.add_argument("--task-category", action="append", help="Hub task category (default: text-generation)")
    p.add_argument("--provenance", help="where the data comes from (a sentence or two)")
    p.add_argument("--format", default="auto", help=_FORMAT_HELP)
    p.set_defaults(func=cmd_card)

    p = cmds.add_parser("generate", help="synthetic data from a task pack")
    p.add_argument("task")
    p.add_argument("--kind", choices=("sft", "dpo", "test"), default="sft")
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--to", choices=FORMATS, help="output format (default: messages for sft, preference for dpo)"
    )
    p.set_defaults(func=cmd_generate)

    p = cmds.add_parser("render", help="print the prompt of each input record of a task")
    p.add_argument("task")
    p.add_argument("file", help="JSONL of task input records")
    p.add_argument("--json", action="store_true", help="print the request messages as JSON lines")
    p.set_defaults(func=cmd_render)

    p = cmds.add_parser("templates", help="list the named chat templates, or print one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_templates)
