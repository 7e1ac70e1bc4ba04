"""The `medtune` command. Sub-commands only parse arguments and call the library.

Each area registers its own sub-commands (`medtune.<area>.cli.register`), so the parser stays
small here and each area's options live beside its code. User errors (`MedtuneError`) are printed
without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from medtune import __version__
from medtune.errors import MedtuneError

# Areas whose `cli.register(subparsers)` adds sub-commands; a missing one is skipped while it is built.
AREAS = ("medtune.config_cli", "medtune.data.cli", "medtune.train.cli", "medtune.serve.cli",
         "medtune.export.cli", "medtune.eval.cli", "medtune.ui.cli")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except MedtuneError as exc:
        print(f"medtune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
