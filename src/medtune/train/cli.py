"""`medtune run`, `medtune train` and `medtune merge`: the training commands.

    medtune run recipes/aria.yaml [KEY=VALUE ...] [--from STEP] [--resume]     # the whole pipeline
    medtune train recipes/aria.yaml --stage sft [KEY=VALUE ...] [--resume]     # one stage
    medtune merge --adapter runs/x/sft --out runs/x/merged [--base MODEL]      # LoRA -> standalone model

On several GPUs the same commands run under accelerate (configs in recipes/accelerate/):
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m medtune.cli train recipes/x.yaml --stage sft

The handlers parse arguments, call `medtune.train.pipeline` / `medtune.train.merge`, and print the
run's metrics tables (training, then base-vs-stage evaluation) from its manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medtune.config import load_recipe
from medtune.errors import ConfigError

STAGES = ("pt", "sft", "dpo")
# Headline numbers shown as percentages: rates in [0, 1] reported by the task scorers.
_NOT_RATES = {"n"}


def _fmt(metric: str, value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    if metric not in _NOT_RATES and 0.0 <= value <= 1.0 and isinstance(value, float):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def training_table(manifest: dict[str, Any]) -> Table:
    table = Table(title=f"{manifest['name']}: training", title_justify="left")
    for column in ("stage", "method", "steps", "train loss", "eval loss", "time", "this run"):
        table.add_column(column, justify="left" if column in ("stage", "method", "this run") else "right")
    for name in STAGES:
        step = manifest["steps"].get(name)
        if not step or step.get("status") != "complete":
            continue
        m = step.get("metrics", {})
        table.add_row(
            name,
            step.get("method", "-") + (" (merged)" if step.get("merged") else ""),
            f"{m.get('global_step', 0):.0f}",
            f"{m['train_loss']:.4f}" if "train_loss" in m else "-",
            f"{m['eval_loss']:.4f}" if "eval_loss" in m else "-",
            f"{step.get('seconds', 0):.0f}s",
            "reused" if step.get("reused") else "trained",
        )
    return table


def eval_table(manifest: dict[str, Any]) -> Table | None:
    step = manifest["steps"].get("eval")
    if not step or not step.get("models"):
        return None
    models = step["models"]
    from medtune.eval.report import recipe_targets

    targets = {
        t.metric: t for t in recipe_targets(manifest.get("recipe", {}).get("eval", {}).get("targets", {}))
    }
    title = f"{manifest['name']}: {step.get('task')} on {step.get('test_cases')} held-out cases"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")
    table.add_column("target", justify="right")
    metrics = [k for k in next(iter(models.values()))["metrics"] if k not in _NOT_RATES]
    final = list(models)[-1]
    for metric in metrics:
        cells = [_fmt(metric, models[name]["metrics"].get(metric)) for name in models]
        target = ""
        if metric in targets:
            t = targets[metric]
            ok = t.check(models[final]["metrics"].get(metric))
            verdict = "[green]pass[/]" if ok else "[red]FAIL[/]"
            target = f"{t.op} {_fmt(metric, t.threshold)} {verdict}"
        table.add_row(metric, *cells, target)
    return table


def print_summary(
    manifest: dict[str, Any], console: Console | None = None, *, with_eval: bool = True
) -> None:
    """The training table, then (after a full run) the evaluation table with the recipe's targets."""
    console = console or Console()
    console.print(training_table(manifest))
    table = eval_table(manifest) if with_eval else None
    if table is not None:
        console.print(table)
    wall = manifest.get("wall_seconds")
    console.print(
        f"run folder: {manifest.get('run_dir', '')}  status: {manifest['status']}"
        + (f"  wall time: {wall:.0f}s" if wall is not None else "")
    )


def _recipe_flags(parser: argparse.ArgumentParser, *, stage: bool) -> None:
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted stage from its newest checkpoint"
    )
    if stage:
        parser.add_argument("--stage", choices=STAGES, help="the stage to train (required)")
    else:
        parser.add_argument(
            "--from",
            dest="from_step",
            metavar="STEP",
            help="rerun from this step on (data, model, pt, sft, dpo, eval)",
        )


def _split_overrides(args: argparse.Namespace) -> None:
    """Options written after the overrides (`train R k=v --stage sft k2=v2`) land in `args.overrides`,
    which argparse collects as a remainder; move them back onto `args`."""
    late = argparse.ArgumentParser(prog=f"medtune {args.command}", add_help=False)
    _recipe_flags(late, stage=args.command == "train")
    found, rest = late.parse_known_args(args.overrides)
    for key, value in vars(found).items():
        if value not in (None, False):
            setattr(args, key, value)
    wrong = [item for item in rest if "=" not in item or item.startswith("-")]
    if wrong:
        raise ConfigError(
            f"medtune {args.command}: unexpected argument(s) {' '.join(wrong)}; overrides are KEY=VALUE"
        )
    args.overrides = rest


def cmd_run(args: argparse.Namespace) -> int:
    from medtune.train.pipeline import run_pipeline

    _split_overrides(args)
    if args.command == "train" and not args.stage:
        raise ConfigError(
            "medtune train: --stage is required (pt, sft or dpo); `medtune run` runs every stage"
        )
    recipe = load_recipe(args.recipe, args.overrides)
    result = run_pipeline(
        recipe,
        recipe_dir=Path(args.recipe).parent,
        from_step=getattr(args, "from_step", None),
        stage=getattr(args, "stage", None),
        resume=args.resume,
    )
    if result.manifest.read_only:  # a non-main process of `accelerate launch`: the main one reports
        return 0
    # After `train --stage`, the manifest's evaluation (if any) predates this stage: not shown.
    print_summary({**result.manifest.data, "run_dir": str(result.run_dir)}, with_eval=args.command == "run")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from medtune.train.merge import merge_adapter

    out = merge_adapter(Path(args.adapter), Path(args.out), base_model=args.base)
    print(f"merged model written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    for command, help_text in (
        ("run", "run a recipe end to end: data, model, stages, eval (steps already done are skipped)"),
        ("train", "train one stage of a recipe (its data and base model are prepared first)"),
    ):
        p = sub.add_parser(command, help=help_text, description=help_text)
        p.add_argument("recipe", help="recipe YAML file (see recipes/)")
        p.add_argument(
            "overrides",
            nargs=argparse.REMAINDER,
            metavar="KEY=VALUE",
            help="recipe overrides, e.g. train.sft.lora.r=16",
        )
        _recipe_flags(p, stage=command == "train")
        p.set_defaults(func=cmd_run, command=command)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base: a standalone safetensors model")
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + weights)")
    p.add_argument(
        "--base", help="base model (hub id or folder); default: the one named in the adapter config"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_merge)
