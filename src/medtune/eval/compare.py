"""`medtune compare RUN_A RUN_B [...]`: runs or evaluation folders side by side.

    table, report = compare_runs(["runs/aria", "runs/aria-lora"], out_dir="compare/")

Each argument is a run folder (`runs/<name>`, with `manifest.json` and usually `report/`) or an
output folder of `medtune eval` / `medtune bench` (with `results.json`, `eval.json` or `bench.json`).
A run contributes its last stage's metrics (plus latency and memory if its report holds a bench);
the table shows every headline metric, latency and memory, and for two sources the difference
B - A. The comparison report (bar chart and table) is written to `out_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError
from medtune.eval.bench import BENCH_JSON
from medtune.eval.metrics import HEADLINE, is_number
from medtune.eval.report import RESULTS_JSON, measured_values, stage_metrics, write_report
from medtune.eval.runner import EVAL_JSON

_EXTRA = ["latency_p50_s", "latency_p99_s", "max_requests_per_s", "peak_memory_gb", "error_rate"]


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_source(path: str | Path) -> tuple[str | None, dict[str, float]]:
    """(task, flat metric values) of a run folder or an eval/bench folder."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{p}: not a folder (expected a run folder or a medtune eval/bench output folder)")
    values: dict[str, float] = {}
    task = None
    manifest = _json(p / "manifest.json")
    if manifest is not None:
        stages = stage_metrics(manifest)
        task = (manifest.get("recipe") or {}).get("task")
        if stages:
            last = list(stages.values())[-1]
            values.update({k: float(v) for k, v in last.items() if is_number(v)})
    if not (p / RESULTS_JSON).is_file() and (p / "report" / RESULTS_JSON).is_file():
        p = p / "report"
    results = _json(p / RESULTS_JSON)
    if results is not None:
        task = task or results.get("task")
        values = {**results.get("measured", {}), **values}
    else:
        ev, bench = _json(p / EVAL_JSON), _json(p / BENCH_JSON)
        if ev or bench:
            task = task or (ev or bench).get("task")
            values = {**measured_values(ev, bench), **values}
    if not values:
        raise ConfigError(
            f"{path}: no metrics found (expected manifest.json with eval steps, {RESULTS_JSON}, {EVAL_JSON} or {BENCH_JSON})"
        )
    return task, values


def _names(paths: list[str | Path]) -> list[str]:
    """Short unique display names: the folder names, made unique with their parents if needed."""
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = ["/".join(Path(p).resolve().parts[-2:]) for p in paths]
    return names


def compare_runs(paths: list[str | Path], out_dir: str | Path | None = None) -> tuple[str, Path]:
    """A plain-text table of the sources side by side and the path of the comparison report."""
    if len(paths) < 2:
        raise ConfigError("compare needs at least two runs or evaluation folders")
    loaded = [load_source(p) for p in paths]
    names = _names(paths)
    tasks = {t for t, _ in loaded if t}
    task = tasks.pop() if len(tasks) == 1 else None
    sources = dict(zip(names, (v for _, v in loaded), strict=True))
    metrics = [m for m in HEADLINE.get(task or "", []) if any(m in v for v in sources.values())]
    if not metrics:
        metrics = sorted({k for v in sources.values() for k, x in v.items() if 0.0 <= x <= 1.0})
    rows = metrics + [m for m in _EXTRA if any(m in v for v in sources.values()) and m not in metrics]
    head = ["metric", *names] + (["B - A"] if len(names) == 2 else [])
    body = []
    for m in rows:
        cells = [sources[n].get(m) for n in names]
        row = [m, *(f"{c:.3f}" if c is not None else "–" for c in cells)]
        if len(names) == 2:
            a, b = cells
            row.append(f"{b - a:+.3f}" if a is not None and b is not None else "–")
        body.append(row)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body])
    out = Path(out_dir) if out_dir else Path("compare-" + "-vs-".join(n.replace("/", "_") for n in names))
    stages = {n: {m: sources[n].get(m) for m in rows} for n in names}
    title = "medtune compare: " + " vs ".join(names)
    report = write_report(out, title=title, stages=stages, ev={}, bench={}, task=task)
    return table, report
