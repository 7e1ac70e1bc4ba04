"""`medtune validate RECIPE [KEY=VALUE ...]`: check a recipe before a long run."""

from __future__ import annotations

import argparse
import sys

from medtune.config import validate_recipe_file


def cmd_validate(args: argparse.Namespace) -> int:
    problems = validate_recipe_file(args.recipe, args.overrides)
    if problems:
        print(f"{args.recipe}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    print(f"{args.recipe}: ok")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a recipe: every problem at once")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.sft.lora.r=16")
    p.set_defaults(func=cmd_validate)
