"""The evaluation numbers: ARIA quality and a latency sweep of the served fine-tuned model.

    python bench/eval_bench.py                 # what `make benchmark` runs
    python bench/eval_bench.py --write         # also rewrite BENCHMARKS.md's evaluation section

If a server already answers at --url (default http://MEDTUNE_HOST:MEDTUNE_PORT, as `make serve-ft`
starts it), that server is measured as it is. Otherwise this script starts the same server
(`medtune serve --model RUN/dpo --served-name aria-ft` on that port), waits for /health, measures,
and stops it. It then runs, against the endpoint, exactly what a user would:

    medtune eval  --task aria --data RUN/data/test.jsonl --out RUN/benchmark   (300 held-out cases)
    medtune bench --task aria --concurrency 1,2,4,8,16 --requests 64 --out RUN/benchmark

and the report lands in RUN/benchmark/ (report.md, report.html, results.json). The eval starts
afresh each time (the model behind a served name may have changed since the last benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from medtune.eval.bench import run_bench
from medtune.eval.report import write_report
from medtune.eval.runner import PREDICTIONS, read_examples, run_eval
from medtune.io import write_text
from medtune.settings import get_settings
from medtune.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- section: evaluation -->", "<!-- end: evaluation -->"


def health(url: str) -> dict | None:
    """The server's /health document, or None when nothing answers."""
    try:
        resp = httpx.get(url + "/health", timeout=2.0)
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


@contextlib.contextmanager
def server(
    url: str, model: Path, served_name: str, port: int, api_key: str | None, log_path: Path
) -> Iterator[str]:
    """Yield a description of the server measured; start (and finally stop) one if none answers."""
    running = health(url)
    if running is not None:
        yield f"the server already running at {url} ({running.get('model', 'model unknown')})"
        return
    if not model.exists():
        sys.exit(f"no server at {url} and no model at {model}: run `make demo` (or `make serve-ft`) first")
    cmd = [sys.executable, "-m", "medtune.cli", "serve", "--model", str(model), "--served-name", served_name,
           "--port", str(port)] + (["--api-key", api_key] if api_key else [])  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while health(url) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start; see {log.name}")
            time.sleep(0.5)
        yield f"`medtune serve --model {model}` started by the benchmark on port {port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def recipe_targets(run: Path) -> dict[str, float] | None:
    manifest = run / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text(encoding="utf-8"))["recipe"]["eval"]["targets"]


def section(results: dict, ev: dict, bench: dict, served: str, command: str) -> str:
    m = ev["metrics"]
    ci = m.get("ci", {})

    def with_ci(key: str) -> str:
        low, high = ci.get(key, (None, None))
        return f"{m[key]:.3f}" + (f" (95% CI {low:.3f}-{high:.3f})" if low is not None else "")

    lines = [
        f"Server: {served}. Command: `{command}`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, no GPU; measured {time.strftime('%Y-%m-%d')} while other jobs shared "
        "the CPU, so latencies are pessimistic. Full report: `report.md` / `report.html` in the output folder.",
        "",
        f"Quality on {ev['n']} held-out ARIA cases (production request: json_schema, temperature 0.1, "
        "max_tokens 256, through the HTTP endpoint):",
        "",
        "| metric | value |",
        "|---|---|",
        f"| pathology exact match | {with_ci('pathology_exact_match')} |",
        f"| JSON valid | {with_ci('json_valid')} |",
        f"| schema valid | {with_ci('schema_valid')} |",
        f"| confidence agreement | {with_ci('confidence_agreement')} |",
        f"| failed requests | {ev['errors']} |",
        "",
        f"Latency sweep ({bench['requests_per_level']} diagnosis requests per level, streamed):",
        "",
        "| concurrency | req/s | tokens/s | P50 s | P95 s | P99 s | TTFT P50 s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in bench["levels"]:
        lines.append(
            f"| {lv['concurrency']} | {lv['requests_per_s']:.2f} | {lv['tokens_per_s']:.0f} | "
            f"{lv['latency_p50_s']:.3f} | {lv['latency_p95_s']:.3f} | {lv['latency_p99_s']:.3f} | "
            f"{lv['ttft_p50_s']:.3f} | {lv['errors']} |"
        )
    mem = bench.get("peak_resident_memory_bytes")
    lines += ["", f"Peak resident memory of the serving process: {mem / 1e9:.2f} GB." if mem else "", ""]
    lines += ["Targets:", "", "| metric | target | measured | result | source |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        value = f"{t['value']:.3f}" if t["value"] is not None else "–"
        verdict = {True: "pass", False: "FAIL", None: "not measured"}[t["passed"]]
        lines.append(
            f"| {t['metric']} | {t['op']} {t['threshold']:g} | {value} | {verdict} | {t['source']} |"
        )
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8")
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    write_text(path, f"{head}{START}\n{text}\n{END}{tail}")


def main() -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/aria", help="run folder (default runs/aria)")
    parser.add_argument(
        "--stage", default="dpo", help="model of the run to serve when no server runs (default dpo)"
    )
    parser.add_argument("--out", help="output folder (default RUN/benchmark)")
    parser.add_argument("--url", default=f"http://127.0.0.1:{settings.port}")
    parser.add_argument("--served-name", default=settings.served_name)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md's evaluation section")
    args = parser.parse_args()

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "benchmark"
    task = get_task("aria")
    test = run / "data" / "test.jsonl"
    examples = read_examples(test, task) if test.is_file() else task.generate_test(300, seed=2)
    (out / PREDICTIONS).unlink(missing_ok=True)
    port = int(args.url.rsplit(":", 1)[1].split("/")[0])
    with server(
        args.url, run / args.stage, args.served_name, port, settings.api_key, out / "server.log"
    ) as served:
        ev = run_eval(
            task, examples, out, endpoint=args.url, model=args.served_name, api_key=settings.api_key
        )
        levels = [int(c) for c in args.concurrency.split(",")]
        bench = run_bench(task, out, endpoint=args.url, model=args.served_name, api_key=settings.api_key,
                          levels=levels, requests=args.requests)  # fmt: skip
    report = write_report(out, targets=recipe_targets(run))
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    print((out / "report.md").read_text(encoding="utf-8").split("## Quality")[0])
    print(f"report: {report}")
    if args.write:
        command = (
            "make benchmark" if len(sys.argv) == 2 else "python bench/eval_bench.py " + " ".join(sys.argv[1:])
        )
        write_section(section(results, ev, bench, served, command))
        print("BENCHMARKS.md: evaluation section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
