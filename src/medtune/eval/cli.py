"""`medtune eval`, `medtune bench`, `medtune report` and `medtune compare`.

    medtune eval --task aria --data test.jsonl --endpoint http://127.0.0.1:8001 --model aria-ft --out eval/
    medtune eval --task aria --generate 300 --model-path runs/aria/dpo --out eval/
    medtune bench --endpoint http://127.0.0.1:8001 --model aria-ft --task aria --out eval/
    medtune report eval/                       # rebuild report.md / report.html / results.json
    medtune compare runs/aria runs/aria-lora   # two runs (or eval folders) side by side

eval and bench write into the same folder and each rebuilds its report, so running both into one
`--out` gives one report with quality, latency and memory.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from medtune.errors import ConfigError


def _task(args: argparse.Namespace) -> Any:
    if args.task == "qa":
        from medtune.eval.metrics import QaTask, read_terms

        terms = read_terms(args.terms) if getattr(args, "terms", None) else None
        return QaTask(terms, max_tokens=args.max_tokens or 512)
    from medtune.tasks import get_task

    task = get_task(args.task)
    if getattr(args, "max_tokens", None):
        task.max_tokens = args.max_tokens
    return task


def _targets(pairs: list[str]) -> dict[str, float]:
    targets = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        try:
            targets[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--target {pair!r}: expected METRIC=NUMBER, e.g. exact_match=0.95") from None
        if not sep or not key.strip():
            raise ConfigError(f"--target {pair!r}: expected METRIC=NUMBER, e.g. exact_match=0.95")
    return targets


def _quiet_http_logs() -> None:
    # The openai client's HTTP library logs every request at INFO: one line per request drowns the progress bar.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _endpoint(args: argparse.Namespace) -> None:
    """Fill --endpoint, --model and --api-key from the machine settings (.env) when not given, so
    `medtune bench --task aria --out DIR` measures the server `medtune serve` starts by default."""
    from medtune.settings import get_settings

    settings = get_settings()
    if args.endpoint is None and getattr(args, "model_path", None) is None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        args.endpoint = f"http://{host}:{settings.port}"
    if args.endpoint is not None:
        args.model = args.model or settings.served_name
        args.api_key = args.api_key or settings.api_key
    _quiet_http_logs()


def cmd_eval(args: argparse.Namespace) -> int:
    from medtune.eval.report import write_report
    from medtune.eval.runner import read_examples, run_eval

    _endpoint(args)
    task = _task(args)
    if args.data:
        examples = read_examples(args.data, task)
    elif args.generate:
        if not hasattr(task, "generate_test"):
            raise ConfigError("--generate: the qa task has no generator; give --data FILE")
        examples = task.generate_test(args.generate, args.seed)
    else:
        raise ConfigError(
            "give the examples: --data FILE, or --generate N for a task pack's synthetic test set"
        )
    result = run_eval(
        task, examples, args.out, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        model_path=args.model_path, engine=args.engine, concurrency=args.concurrency,
        batch_size=args.batch_size, max_retries=args.max_retries, timeout=args.timeout,
        show_progress=not args.quiet,
    )  # fmt: skip
    report = write_report(args.out, targets=_targets(args.target))
    m = result["metrics"]
    shown = [k for k in m if isinstance(m[k], float)]
    print("  ".join(f"{k}={m[k]:.3f}" for k in shown))
    if result["errors"]:
        print(f"{result['errors']} request(s) failed; run the same command again to retry them")
    print(f"report: {report}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from medtune.eval.bench import parse_levels, run_bench
    from medtune.eval.report import write_report

    _endpoint(args)
    task = _task(args)
    result = run_bench(
        task, args.out, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        levels=parse_levels(args.concurrency), requests=args.requests, seed=args.seed, timeout=args.timeout,
    )  # fmt: skip
    report = write_report(args.out, targets=_targets(args.target))
    print(
        f"{'conc':>5} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'ttft50':>7} {'errors':>6}"
    )
    for lv in result["levels"]:
        cells = [lv["latency_p50_s"], lv["latency_p95_s"], lv["latency_p99_s"], lv["ttft_p50_s"]]
        lat = " ".join(f"{v:7.3f}" if v is not None else f"{'-':>7}" for v in cells)
        print(
            f"{lv['concurrency']:>5} {lv['requests_per_s']:8.2f} {lv['tokens_per_s']:8.1f} {lat} {lv['errors']:>6}"
        )
    mem = result["peak_resident_memory_bytes"]
    print(f"peak resident memory: {mem / 1e9:.2f} GB" if mem else "peak resident memory: not reported")
    print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medtune.eval.report import write_report

    print(f"report: {write_report(args.dir, targets=_targets(args.target))}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from medtune.eval.compare import compare_runs

    table, report = compare_runs(args.runs, out_dir=args.out)
    print(table)
    print(f"report: {report}")
    return 0


def _endpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint", help="OpenAI-compatible server, e.g. http://127.0.0.1:8001 (default: MEDTUNE_HOST/PORT)"
    )
    p.add_argument(
        "--model", help="served model name at the endpoint (default: MEDTUNE_SERVED_NAME, aria-ft)"
    )
    p.add_argument("--api-key", help="bearer key (default: MEDTUNE_API_KEY from the environment or .env)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="aria, headache or qa (free-text answers vs references)")
    p.add_argument("--out", required=True, help="folder for answers, metrics and the report")
    p.add_argument("--seed", type=int, default=2, help="seed of generated test cases (default 2)")
    p.add_argument("--max-tokens", type=int, help="override the task's production max_tokens")
    p.add_argument("--target", action="append", metavar="METRIC=VALUE", help="extra pass/fail target")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model or endpoint on a task's test set (resumable)",
        description="Send a task's production requests to an endpoint (or a model folder), score the "
        "answers, write OUT/report.md. Answers are saved as they arrive: re-running the same command "
        "resumes; use a new --out for a different model.",
    )
    _common(p)
    p.add_argument("--data", help="test examples (JSONL/JSON/CSV/Parquet)")
    p.add_argument("--generate", type=int, metavar="N", help="use N synthetic test cases of the task pack")
    _endpoint_options(p)
    p.add_argument("--model-path", help="evaluate a model folder in-process instead of an endpoint")
    p.add_argument("--engine", default="transformers", help="in-process engine (transformers, llamacpp)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--batch-size", type=int, default=16, help="in-process batch size (default 16)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of transient errors (default 3)")
    p.add_argument("--terms", help="qa: term list (one per line) for terminology coverage")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench",
        help="latency / throughput sweep against an OpenAI-compatible endpoint",
        description="Latency P50/P95/P99, time to first token, tokens/s and requests/s at each "
        "concurrency level, error rate and peak server memory; writes OUT/bench.json and the report.",
    )
    _common(p)
    _endpoint_options(p)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="levels, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--requests", type=int, default=64, help="requests per level (default 64)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rebuild report.md/report.html/results.json of an eval folder")
    p.add_argument("dir")
    p.add_argument("--target", action="append", metavar="METRIC=VALUE")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="put runs (or eval folders) side by side")
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (runs/NAME) or eval/bench output folders"
    )
    p.add_argument("--out", help="folder for the comparison report (default: compare-A-vs-B)")
    p.set_defaults(func=cmd_compare)
