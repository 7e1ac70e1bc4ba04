"""Reports: `report.md`, a self-contained `report.html` (plots inlined) and `results.json`.

    write_report("eval/")                      # from eval.json and/or bench.json found in the folder
    write_run_report(run_dir, manifest)        # at the end of `medtune run`: base -> SFT -> DPO

A report gathers what was measured (task metrics with bootstrap intervals, latency sweep, peak
serving memory, per-stage comparison), draws the plots (`medtune.eval.plots`) and checks targets:
the seed's (ARIA: JSON valid 100%, pathology exact match >= 80%, P50 < 1.5 s, P99 < 3 s, serving
memory < 10 GB), the task defaults below, and the recipe's `eval.targets` (metric -> threshold; a
metric whose name says time, memory, errors or false positives must stay at or below it, any other
at or above). Latency targets use the lowest concurrency level of the sweep (one user at a time).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError, DataError
from medtune.eval import plots
from medtune.eval.bench import BENCH_JSON, percentile
from medtune.eval.metrics import HEADLINE, is_number
from medtune.eval.runner import EVAL_JSON
from medtune.io import write_json, write_text

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"


@dataclass
class Target:
    metric: str
    op: str  # ">=", ">", "<=", "<"
    threshold: float
    source: str = "seed"

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return {">=": value >= self.threshold, ">": value > self.threshold,
                "<=": value <= self.threshold, "<": value < self.threshold}[self.op]  # fmt: skip


DEFAULT_TARGETS: dict[str, list[Target]] = {
    "aria": [
        Target("json_valid", ">=", 1.0),
        Target("pathology_exact_match", ">=", 0.80),
        Target("latency_p50_s", "<", 1.5),
        Target("latency_p99_s", "<", 3.0),
        Target("peak_memory_gb", "<", 10.0),
    ],
    "headache": [
        Target("format_compliance", ">=", 0.98, "task"),
        Target("red_flag_sensitivity", ">=", 0.95, "task"),
        Target("false_positive_rate", "<=", 0.05, "task"),
    ],
}
ALIASES = {"exact_match": "pathology_exact_match", "json": "json_valid", "p50_s": "latency_p50_s",
           "p95_s": "latency_p95_s", "p99_s": "latency_p99_s", "memory_gb": "peak_memory_gb"}  # fmt: skip


def lower_is_better(metric: str) -> bool:
    """Time, memory, errors, false positives, truncated or empty answers: smaller is better."""
    words = ("error", "false_positive", "latency", "ttft", "truncated", "empty")
    return metric.endswith(("_s", "_gb", "_bytes")) or any(w in metric for w in words)


def recipe_targets(targets: dict[str, float]) -> list[Target]:
    """The recipe's `eval.targets` as Targets (direction from the metric's name)."""
    out = []
    for name, threshold in targets.items():
        metric = ALIASES.get(name, name)
        out.append(Target(metric, "<=" if lower_is_better(metric) else ">=", float(threshold), "recipe"))
    return out


def measured_values(ev: dict[str, Any] | None, bench: dict[str, Any] | None) -> dict[str, float]:
    """Flat metric -> value for target checks: task metrics, latency, memory."""
    values: dict[str, float] = {}
    if ev:
        for k, v in ev["metrics"].items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                values[k] = float(v)
        values["error_rate"] = ev.get("error_rate", 0.0)
        lat = ev.get("latencies_s") or []
        for q in (50, 95, 99):
            if lat:
                values[f"latency_p{q}_s"] = percentile(lat, q)
    if bench and bench["levels"]:
        first = min(bench["levels"], key=lambda lv: lv["concurrency"])
        for key in ("latency_p50_s", "latency_p95_s", "latency_p99_s", "ttft_p50_s"):
            if first[key] is not None:
                values[key] = first[key]
        values["bench_error_rate"] = max(lv["error_rate"] for lv in bench["levels"])
        values["max_requests_per_s"] = max(lv["requests_per_s"] for lv in bench["levels"])
        if bench.get("peak_resident_memory_bytes"):
            values["peak_memory_gb"] = bench["peak_resident_memory_bytes"] / 1e9
        if bench.get("peak_gpu_memory_bytes"):
            values["peak_gpu_memory_gb"] = bench["peak_gpu_memory_bytes"] / 1e9
    return values


def check_targets(task: str | None, values: dict[str, float], extra: dict[str, float] | None) -> list[dict]:
    """Each target with its measured value and pass (True/False, None when not measured). A recipe
    target on a metric the seed also targets is listed beside it (e.g. exact match >= 0.80 and >= 0.95)."""
    targets = DEFAULT_TARGETS.get(task or "", []) + recipe_targets(extra or {})
    seen: set[tuple[str, str, float]] = set()
    out = []
    for t in targets:
        if (t.metric, t.op, t.threshold) in seen:
            continue
        seen.add((t.metric, t.op, t.threshold))
        out.append({**asdict(t), "value": values.get(t.metric), "passed": t.check(values.get(t.metric))})
    return out


def _load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


class _Doc:
    """A report as blocks, rendered to Markdown and to self-contained HTML from the same content."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[tuple[str, Any]] = []

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (head, [[_fmt(c) for c in r] for r in rows])))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", (path, alt)))

    def markdown(self, root: Path) -> str:
        out = [f"# {self.title}", ""]
        for kind, data in self.blocks:
            if kind == "h2":
                out += [f"## {data}", ""]
            elif kind == "p":
                out += [data, ""]
            elif kind == "table":
                head, rows = data
                out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
            else:
                path, alt = data
                out += [f"![{alt}]({path.relative_to(root).as_posix()})", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, data in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{html.escape(data)}</h2>")
            elif kind == "p":
                body.append(f"<p>{html.escape(data)}</p>")
            elif kind == "table":
                head, rows = data
                cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
                trs = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
                )
                body.append(f"<table><tr>{cells}</tr>{trs}</table>")
            else:
                path, alt = data
                b64 = base64.b64encode(path.read_bytes()).decode("ascii")
                body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">')
        style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                 "text-align:left}img{max-width:100%;display:block;margin:1em 0}")  # fmt: skip
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")  # fmt: skip


def _strip_lists(bench: dict[str, Any]) -> dict[str, Any]:
    """bench.json without the per-request lists (results.json stays small)."""
    return {**bench, "levels": [{k: v for k, v in lv.items() if k not in ("latencies_s", "ttfts_s")}
                                for lv in bench["levels"]]}  # fmt: skip


def write_report(
    out_dir: str | Path,
    *,
    title: str | None = None,
    targets: dict[str, float] | None = None,
    stages: dict[str, dict[str, Any]] | None = None,
    ev: dict[str, Any] | None = None,
    bench: dict[str, Any] | None = None,
    task: str | None = None,
) -> Path:
    """Write report.md, report.html, results.json and plots/*.png in `out_dir`; return report.md.

    `ev` / `bench` default to eval.json / bench.json in `out_dir`; `stages` maps a stage or run name
    to its metrics (the base -> SFT -> DPO comparison); `targets` are the recipe's eval.targets."""
    out = Path(out_dir)
    ev = ev if ev is not None else _load(out / EVAL_JSON)
    bench = bench if bench is not None else _load(out / BENCH_JSON)
    if ev is None and bench is None and not stages:
        raise ConfigError(
            f"{out}: nothing to report (no {EVAL_JSON}, no {BENCH_JSON}); run medtune eval or bench"
        )
    task = task or (ev or bench or {}).get("task")
    who = (ev or bench or {}).get("model") or (ev or {}).get("model_path") or ""
    doc = _Doc(title or f"medtune report: {task or 'run'} {who}".strip())
    doc.p(f"Generated {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.")
    plot_dir = out / "plots"
    made: dict[str, str] = {}
    values = measured_values(ev, bench)
    checks = check_targets(task, values, targets)

    if checks:
        doc.h2("Targets")
        rows = [[c["metric"], f"{c['op']} {_fmt(c['threshold'])}", c["value"],
                 {True: "PASS", False: "FAIL", None: "not measured"}[c["passed"]], c["source"]] for c in checks]  # fmt: skip
        doc.table(["metric", "target", "measured", "result", "source"], rows)

    if ev:
        m = ev["metrics"]
        doc.h2(f"Quality ({ev['n']} examples)")
        ci = m.get("ci", {})
        names = [k for k in HEADLINE.get(task or "", []) if k in m] or [
            k for k, v in m.items() if isinstance(v, float)
        ]
        rows = [[k, m[k], f"[{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else None] for k in names]
        rows += [[k, v, None] for k, v in m.items() if k not in names and isinstance(v, int | float)]
        doc.table(["metric", "value", "95% CI (bootstrap)"], rows)
        if ev.get("errors"):
            doc.p(f"{ev['errors']} request(s) failed after retries (error rate {ev['error_rate']:.3f}).")
        per = m.get("per_pathology") or m.get("per_label")
        if isinstance(per, dict) and per:
            keys = sorted({k for v in per.values() if isinstance(v, dict) for k in v})
            doc.table(["label", *keys], [[label, *[v.get(k) for k in keys]] for label, v in per.items()])
        if isinstance(m.get("confusion"), dict) and m["confusion"]:
            made["confusion"] = str(plots.confusion_matrix(m["confusion"], plot_dir / "confusion.png"))
            doc.img(Path(made["confusion"]), "confusion matrix")

    if stages:
        doc.h2("Comparison")
        names = [k for k in HEADLINE.get(task or "", []) if any(k in s for s in stages.values())]
        names += sorted({k for s in stages.values() for k, v in s.items() if is_number(v)} - set(names))
        doc.table(["metric", *stages], [[k, *[s.get(k) for s in stages.values()]] for k in names])
        # The bar chart shows rates (0-1); times and memory stay in the table.
        rates = [k for k in names if all(0.0 <= s[k] <= 1.0 for s in stages.values() if is_number(s.get(k)))]
        rates = [k for k in rates if not lower_is_better(k) or "false_positive" in k][:8]
        made["comparison"] = str(plots.stage_comparison(stages, rates, plot_dir / "comparison.png"))
        doc.img(Path(made["comparison"]), "comparison")

    if bench:
        doc.h2(f"Latency and throughput ({bench['requests_per_level']} requests per level)")
        keys = ["concurrency", "requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s",
                "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "error_rate"]  # fmt: skip
        doc.table(keys, [[lv[k] for k in keys] for lv in bench["levels"]])
        mem = bench.get("peak_resident_memory_bytes")
        gpu = bench.get("peak_gpu_memory_bytes")
        doc.p(
            f"Peak resident memory of the serving process: {mem / 1e9:.2f} GB." if mem
            else "Peak resident memory: not reported (the endpoint has no Prometheus /metrics)."
        )  # fmt: skip
        if gpu:
            doc.p(f"Peak GPU memory: {gpu / 1e9:.2f} GB.")
        made["latency_hist"] = str(plots.latency_histogram(bench["levels"], plot_dir / "latency_hist.png"))
        made["latency_cdf"] = str(plots.latency_cdf(bench["levels"], plot_dir / "latency_cdf.png"))
        made["throughput"] = str(plots.throughput(bench["levels"], plot_dir / "throughput.png"))
        for key, alt in (
            ("latency_hist", "latency histogram"),
            ("latency_cdf", "latency CDF"),
            ("throughput", "throughput"),
        ):
            doc.img(Path(made[key]), alt)

    results = {
        "title": doc.title,
        "task": task,
        "eval": {k: v for k, v in ev.items() if k != "latencies_s"} if ev else None,
        "bench": _strip_lists(bench) if bench else None,
        "stages": stages,
        "measured": values,
        "targets": checks,
        "passed": all(c["passed"] for c in checks if c["passed"] is not None) if checks else None,
        "plots": {k: Path(v).relative_to(out).as_posix() for k, v in made.items()},
    }
    write_json(out / RESULTS_JSON, results)
    write_text(out / "report.html", doc.html())
    return write_text(out / "report.md", doc.markdown(out))


def stage_metrics(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-model evaluation metrics of a run manifest, in run order (base, sft, dpo): the `eval`
    step's `models` (name -> {"metrics": {...}, ...}) that `medtune run` records."""
    step = manifest.get("steps", {}).get("eval", {})
    if step.get("status") != "complete":
        return {}
    return {name: entry["metrics"] for name, entry in step.get("models", {}).items() if entry.get("metrics")}


def write_run_report(run_dir: str | Path, manifest: Any) -> Path:
    """The report that ends `medtune run`: base -> SFT -> DPO comparison, the last model's quality
    (confusion matrix and intervals from `eval/<model>/metrics.json`) and targets (the seed's and
    the recipe's `eval.targets`), written to `<run_dir>/report/`. A bench.json already there (from
    `medtune bench --out <run_dir>/report`) is included. `manifest` is the manifest dict or an
    object with `.data` (`medtune.train.manifest.Manifest`)."""
    run = Path(run_dir)
    data = getattr(manifest, "data", manifest)
    stages = stage_metrics(data)
    if not stages:
        raise ConfigError(f"{run}: the manifest has no completed eval step to report")
    last = list(stages)[-1]
    full = _load(run / "eval" / last / "metrics.json") or stages[last]
    recipe = data.get("recipe") or {}
    ev = {"task": recipe.get("task"), "model_path": str(run / last), "n": full.get("n"),
          "errors": 0, "error_rate": 0.0, "metrics": full}  # fmt: skip
    targets = (recipe.get("eval") or {}).get("targets") or {}
    title = f"medtune run {data.get('name', run.name)}: {' -> '.join(stages)}"
    return write_report(run / "report", title=title, targets=targets, stages=stages, ev=ev)
