"""The training numbers: `make demo` (and the headache recipe) timed from scratch on this machine.

    python bench/train_demo.py                  # aria (the `make demo` recipe), then headache
    python bench/train_demo.py --write          # also rewrite BENCHMARKS.md's training section
    python bench/train_demo.py --recipes recipes/aria.yaml

Each recipe runs exactly as a user runs it, `medtune run RECIPE`, in a fresh output folder (so no step
is reused): data generation, tokenizer and model build, SFT, DPO, merges, and the evaluation of base,
SFT and DPO on the held-out test set. The wall time is measured around the whole command (what a
user waits for); per-step times, metrics and target checks are read from the run's manifest. The
load average is recorded before and after: on a shared machine the wall times are pessimistic.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medtune.io import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- section: training (make demo) -->", "<!-- end: training -->"
STEPS = ("data", "model", "pt", "sft", "dpo", "eval")
DEFAULT_RECIPES = ("recipes/aria.yaml", "recipes/headache.yaml")


def run_recipe(recipe: Path, out: Path) -> dict[str, Any]:
    """`medtune run RECIPE output_dir=OUT` from scratch; its wall time, load and manifest."""
    cmd = [sys.executable, "-m", "medtune.cli", "run", str(recipe), f"output_dir={out}"]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {done.returncode}")
    runs = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    manifest = json.loads((runs[0] / "manifest.json").read_text(encoding="utf-8"))
    print(done.stdout)  # the run's own tables
    return {
        "recipe": str(recipe),
        "command": f"medtune run {recipe}",
        "wall_s": round(wall, 1),
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        "steps_s": {s: manifest["steps"][s].get("seconds") for s in STEPS if s in manifest["steps"]},
        "manifest": manifest,
    }


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "–"


def recipe_section(result: dict[str, Any]) -> str:
    m = result["manifest"]
    ev = m["steps"].get("eval", {})
    models = ev.get("models", {})
    lines = [
        f"### {m['name']}: {ev.get('test_cases', '?')} held-out cases (test seed {m['recipe']['data']['generate']['test_seed']})",
        "",
    ]
    if not models:
        return "\n".join([*lines, "_no evaluation in this recipe_"])
    metrics = [
        k for k, v in next(iter(models.values()))["metrics"].items() if k != "n" and isinstance(v, float)
    ]
    lines += ["| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for metric in metrics:
        lines.append(
            f"| {metric} | " + " | ".join(_pct(models[n]["metrics"].get(metric)) for n in models) + " |"
        )
    targets = m.get("targets", [])
    if targets:
        lines += [
            "",
            f"Targets, on the last model ({list(models)[-1]}):",
            "",
            "| metric | target | value | |",
            "|---|---|---:|---|",
        ]
        for t in targets:
            verdict = "pass" if t["passed"] else "**FAIL**"
            lines.append(
                f"| {t['metric']} | {t['op']} {_pct(t['threshold'])} | {_pct(t['value'])} | {verdict} |"
            )
    sft = m["steps"].get("sft", {}).get("metrics", {})
    if sft:
        lines += ["", f"SFT: {sft.get('global_step', 0):.0f} steps, final train loss {sft.get('train_loss', 0):.4f}"
                  + (f", validation loss {sft['eval_loss']:.4f}" if "eval_loss" in sft else "") + "."]  # fmt: skip
    return "\n".join(lines)


def section(results: list[dict[str, Any]], command: str) -> str:
    cores = os.cpu_count() or 0
    date = dt.date.today().isoformat()
    lines = [
        f"Measured {date} by `{command}`: each recipe run from scratch with `medtune run RECIPE` (generate data, "
        "train the tokenizer and build the ~2M-parameter embedded model, SFT, DPO, merges, evaluation of base, "
        "SFT and DPO on the held-out test set with constrained decoding), timed around the whole command. "
        "One run per recipe, not a median (a run takes minutes); seeds are fixed, so the metrics repeat "
        "exactly from run to run and only the wall time varies.",
        "",
        "| command | wall time | data | model | sft | dpo | eval | load avg (1 min) before → after |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        s = r["steps_s"]
        cells = [
            f"{s[k]:.0f} s" if s.get(k) is not None else "–" for k in ("data", "model", "sft", "dpo", "eval")
        ]
        lines.append(f"| `{r['command']}` | **{r['wall_s'] / 60:.1f} min** | " + " | ".join(cells)
                     + f" | {r['load_avg_1min'][0]} → {r['load_avg_1min'][1]} |")  # fmt: skip
    busiest = max(max(r["load_avg_1min"]) for r in results)
    if busiest > cores:
        lines += ["", f"_The {cores} cores were shared with other jobs during this measurement (load average up to "
                  f"{busiest:.1f}): the wall times above are pessimistic; the metrics do not depend on load._"]  # fmt: skip
    for r in results:
        lines += ["", recipe_section(r)]
    versions = results[0]["manifest"]["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8")
    head, found, rest = doc.partition(START)
    if not found:
        raise SystemExit(f"{path}: marker {START!r} not found")
    _, _, tail = rest.partition(END)
    write_text(path, f"{head}{START}\n{text}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--out", default="runs/bench-train", help="scratch folder (emptied first)")
    parser.add_argument("--write", action="store_true", help="rewrite BENCHMARKS.md's training section")
    args = parser.parse_args()
    scratch = ROOT / args.out
    results = []
    for recipe in args.recipes:
        out = scratch / Path(recipe).stem
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        result = run_recipe(Path(recipe), out)
        print(f"{recipe}: {result['wall_s'] / 60:.1f} min wall time")
        results.append(result)
    write_json(scratch / "results.json", [{k: v for k, v in r.items() if k != "manifest"} for r in results])
    if args.write:
        command = "python bench/train_demo.py --write" + (
            "" if tuple(args.recipes) == DEFAULT_RECIPES else " --recipes " + " ".join(args.recipes)
        )
        write_section(section(results, command))
        print("BENCHMARKS.md: training section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
