"""The report's figures, drawn with matplotlib and saved as PNG files.

Each function takes plain numbers (as found in `eval.json`, `bench.json` or a run manifest), writes
one PNG and returns its path. The object-oriented `Figure` API is used instead of pyplot so no
global state or GUI backend is involved (reports are written from worker processes and tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medtune.io import atomic_path


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def latency_histogram(levels: list[dict[str, Any]], path: Path) -> Path:
    """Histogram of request latencies, one series per concurrency level."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    every = [v for lv in levels for v in lv["latencies_s"]]
    bins = np.linspace(0, max(every) * 1.05, 30) if every else 10
    for lv in levels:
        if lv["latencies_s"]:
            ax.hist(lv["latencies_s"], bins=bins, alpha=0.55, label=f"c={lv['concurrency']}")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("requests")
    ax.set_title("Request latency")
    if every:
        ax.legend(title="concurrency", fontsize=8)
    return _save(fig, path)


def latency_cdf(levels: list[dict[str, Any]], path: Path) -> Path:
    """Empirical CDF of latency per concurrency level, with P50 and P99 guides."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    for lv in levels:
        values = np.sort(lv["latencies_s"])
        if len(values):
            ax.step(
                values,
                np.arange(1, len(values) + 1) / len(values),
                where="post",
                label=f"c={lv['concurrency']}",
            )
    for q in (0.5, 0.99):
        ax.axhline(q, color="grey", lw=0.7, ls="--")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("Latency CDF")
    ax.legend(title="concurrency", fontsize=8)
    return _save(fig, path)


def throughput(levels: list[dict[str, Any]], path: Path) -> Path:
    """Requests/s and tokens/s against concurrency, with P50/P99 latency beside."""
    conc = [lv["concurrency"] for lv in levels]
    fig = Figure(figsize=(9.6, 3.8))
    ax, ax_lat = fig.subplots(1, 2)
    ax.plot(conc, [lv["requests_per_s"] for lv in levels], "o-", label="requests/s")
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    tok = ax.twinx()
    tok.plot(conc, [lv["tokens_per_s"] for lv in levels], "s--", color="tab:orange", label="tokens/s")
    tok.set_ylabel("completion tokens/s")
    ax.set_title("Throughput")
    ax.legend(handles=ax.get_lines() + tok.get_lines(), fontsize=8, loc="upper left")
    for key, style in (("latency_p50_s", "o-"), ("latency_p99_s", "^--"), ("ttft_p50_s", "x:")):
        ax_lat.plot(
            conc, [lv[key] if lv[key] is not None else np.nan for lv in levels], style, label=key[:-2]
        )
    ax_lat.set_xscale("log", base=2)
    ax_lat.set_xticks(conc, [str(c) for c in conc])
    ax_lat.set_xlabel("concurrency")
    ax_lat.set_ylabel("seconds")
    ax_lat.set_title("Latency vs load")
    ax_lat.legend(fontsize=8)
    return _save(fig, path)


def confusion_matrix(confusion: dict[str, dict[str, int]], path: Path) -> Path:
    """Reference label (rows) x predicted label (columns) counts, 'invalid' included."""
    rows = list(confusion)
    cols = list(dict.fromkeys(c for r in rows for c in confusion[r]))
    grid = np.array([[confusion[r].get(c, 0) for c in cols] for r in rows])
    fig = Figure(figsize=(1.6 + 0.75 * len(cols), 1.4 + 0.5 * len(rows)))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(cols)), [_short(c) for c in cols], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows], fontsize=8)
    top = grid.max() if grid.size else 0
    for i in range(len(rows)):
        for j in range(len(cols)):
            if grid[i, j]:
                color = "white" if grid[i, j] > top / 2 else "black"
                ax.text(j, i, str(grid[i, j]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("Confusion matrix")
    return _save(fig, path)


def stage_comparison(stages: dict[str, dict[str, float]], metrics: list[str], path: Path) -> Path:
    """Grouped bars: each headline metric (0-1) for each stage (base -> SFT -> DPO, or runs)."""
    names = list(stages)
    fig = Figure(figsize=(max(6.4, 1.6 * len(metrics) + 2), 3.8))
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(metrics))
    for i, name in enumerate(names):
        values = [stages[name].get(m) for m in metrics]
        bars = ax.bar(x + i * width, [v if v is not None else 0 for v in values], width, label=name)
        for bar, v in zip(bars, values, strict=True):
            if v is not None:
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    bar.get_height() + 0.01,
                    f"{v:.2f}",
                    ha="center",
                    fontsize=7,
                )
    ax.set_xticks(x + width * (len(names) - 1) / 2, metrics, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("score")
    ax.set_title("Comparison")
    ax.legend(fontsize=8, loc="upper right", ncol=len(names))
    return _save(fig, path)


def _short(label: str, n: int = 22) -> str:
    """A tick label: short labels as they are, 'Syndrome ... (SFP)' as its abbreviation."""
    if len(label) <= n:
        return label
    if label.endswith(")") and "(" in label:
        return label[label.rindex("(") + 1 : -1]
    return label[: n - 1] + "…"
