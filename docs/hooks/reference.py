"""Generated documentation: the recipe schema, the machine settings, the command line, task tables.

Rendered at build time from the code itself (the pydantic models in `medtune.config`,
`medtune.settings` and the serve settings, the argparse tree in `medtune.cli`, the task packs' rule
tables), so the site cannot drift from what medtune accepts. mkdocs runs this file as a hook
(`hooks:` in mkdocs.yml): whole pages are added as virtual files (`on_files`), and a marker
`<!-- generated: NAME -->` in a hand-written page is replaced by the snippet NAME
(`on_page_markdown`; an unknown name fails the build). Run it by hand to see one page:

    .venv/bin/python docs/hooks/reference.py recipe      # or: settings, cli
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# src_uri in the site -> function returning the page's Markdown.
PAGES: dict[str, str] = {
    "reference/recipe.md": "recipe_page",
    "reference/settings.md": "settings_page",
    "reference/cli.md": "cli_page",
}


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside `X`, `X | None` or `Optional[X]`, else None (a plain value)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def type_name(annotation: Any) -> str:
    """A short, readable type: `int`, `str | null`, `one of: a, b`, `list of str`, `map str -> str`."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(f"`{v}`" for v in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in get_args(annotation)]
        return " or ".join("null" if p == "NoneType" else p for p in parts)
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        return f"list of {type_name(item)}"
    if origin is dict:
        key, value = get_args(annotation) or (Any, Any)
        return f"map {type_name(key)} → {type_name(value)}"
    if annotation is type(None):
        return "NoneType"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return PydanticUndefined


def _show(value: Any) -> str:
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    text = text.removesuffix("...").strip()
    return f"`{text}`"


def _constraints(field: FieldInfo) -> str:
    names = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "min length"}
    found = []
    for meta in field.metadata:
        for attr, sign in names.items():
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return f" ({', '.join(found)})" if found else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def schema_sections(
    model: type[BaseModel], prefix: str = "", instance: BaseModel | None = None
) -> list[tuple[str, type[BaseModel], list[str]]]:
    """[(section key, model, table rows)] for `model` and every nested section, depth first.

    Defaults come from `instance` (the parent's default for this section) when there is one, so a
    section whose parent overrides its defaults (train.dpo's learning rate) shows the real values."""
    rows: list[str] = []
    nested: list[tuple[str, type[BaseModel], list[str]]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = getattr(instance, name) if instance is not None else _default(field)
        sub = _section_model(field.annotation)
        if sub is not None:
            nullable = " (or `null` to turn it off)" if type(None) in get_args(field.annotation) else ""
            rows.append(f"| `{key}` | section: [{key}](#{key.replace('.', '')}){nullable} | | |")
            nested.extend(
                schema_sections(sub, f"{key}.", default if isinstance(default, BaseModel) else None)
            )
            continue
        rows.append(
            f"| `{key}` | {_cell(type_name(field.annotation))}{_cell(_constraints(field))} "
            f"| {_cell(_show(default))} | {_cell(field.description or '')} |"
        )
    return [(prefix.rstrip("."), model, rows), *nested]


def recipe_page() -> str:
    from medtune.config import Recipe

    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated from medtune.config by docs/hooks/reference.py at build time: do not edit. -->",
        "",
        "A recipe is one YAML file that describes a whole run. Every key below can be set in the file",
        "or overridden on the command line as `KEY=VALUE` (`medtune train recipes/aria.yaml",
        "train.sft.lora.r=16`); `medtune validate RECIPE` checks a recipe and lists every problem at",
        "once. Unknown keys are errors (with a *did you mean*).",
        "",
    ]
    for key, model, rows in schema_sections(Recipe):
        title = key or "Top level"
        lines += [f"## {title}", ""]
        doc = (model.__doc__ or "").strip()
        if doc and model.__module__ == "medtune.config":
            lines += [doc, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    example = Recipe(name="example").model_dump(mode="json")
    lines += [
        "## Every default, as YAML",
        "",
        "The recipe `name: example` with nothing else resolves to:",
        "",
        "```yaml",
        yaml.safe_dump(example, sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _serve_option_help() -> dict[str, str]:
    """`medtune serve` option help by destination name: the description of a setting that has none."""
    from medtune.cli import build_parser

    serve = _subcommands(build_parser()).get("serve")
    if serve is None:
        return {}
    return {a.dest: a.help for a in serve._actions if a.help and a.help != argparse.SUPPRESS}


def _settings_rows(model: type[BaseModel], skip: set[str]) -> list[str]:
    prefix = model.model_config.get("env_prefix", "")
    helps = _serve_option_help()
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        alias = field.validation_alias
        names = list(getattr(alias, "choices", [])) if alias is not None else [f"{prefix}{name}".upper()]
        shown = " or ".join(f"`{n}`" for n in names)
        rows.append(
            f"| {shown} | {_cell(type_name(field.annotation))}{_cell(_constraints(field))} "
            f"| {_cell(_show(_default(field)))} | {_cell(field.description or helps.get(name, ''))} |"
        )
    return rows


def settings_page() -> str:
    from medtune.serve.cli import ServeSettings
    from medtune.settings import Settings

    lines = [
        "# Machine settings",
        "",
        "<!-- Generated from medtune.settings by docs/hooks/reference.py at build time: do not edit. -->",
        "",
        "What belongs to a host rather than a recipe. Read from environment variables and from a",
        "`.env` file in the current directory (copy `.env.example`); command-line options override",
        "them.",
        "",
        *_settings_rows(Settings, set()),
        "",
        "## Serving",
        "",
        "Read by `medtune serve` on top of the settings above (`medtune serve --help` for the options).",
        "",
        *_settings_rows(ServeSettings, set(Settings.model_fields)),
        "",
    ]
    return "\n".join(lines)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page() -> str:
    from medtune.cli import build_parser

    lines = [
        "# Command line",
        "",
        "<!-- Generated from medtune.cli by docs/hooks/reference.py at build time: do not edit. -->",
        "",
        "Every sub-command's `--help`, as the installed `medtune` prints it.",
        "",
    ]
    parser = build_parser()

    def walk(p: argparse.ArgumentParser, path: str, depth: int) -> None:
        nonlocal lines
        lines += [f"{'#' * depth} `{path}`", "", "```text", p.format_help().rstrip(), "```", ""]
        for name, child in _subcommands(p).items():
            walk(child, f"{path} {name}", min(depth + 1, 4))

    walk(parser, "medtune", 2)
    return "\n".join(lines)


# --- snippets for hand-written pages ----------------------------------------------------------------


def _aria_schema() -> str:
    import json

    from medtune.tasks import get_task

    schema = get_task("aria").output_schema()
    return "```json\n" + json.dumps(schema, indent=2, ensure_ascii=False) + "\n```"


def _aria_signals() -> str:
    from medtune.tasks.aria_rules import FIELDS, NO_PATHOLOGY, SIGNALS, fmt_threshold

    rows = ["| pathologie | signal |", "|---|---|"]
    for pathology, signal in SIGNALS.items():
        rows.append(f"| {pathology} | " + " and ".join(f"`{f}` > {fmt_threshold(f)}" for f in signal) + " |")
    rows.append(f"| {NO_PATHOLOGY} | no signal fires |")
    ranges = ", ".join(f"`{f.name}` {f.low:g} to {f.high:g}{f.unit}" for f in FIELDS.values())
    return "\n".join(rows) + f"\n\nPlausible ranges (outside them a record is refused): {ranges}."


def _aria_confidence() -> str:
    from medtune.tasks.aria_rules import HIGH_MARGIN, MODERATE_MARGIN

    return "\n".join(
        [
            "| decisive margin | confiance |",
            "|---|---|",
            f"| ≥ {HIGH_MARGIN:.0%} | `élevée` |",
            f"| ≥ {MODERATE_MARGIN:.0%} and < {HIGH_MARGIN:.0%} | `modérée` |",
            f"| < {MODERATE_MARGIN:.0%} | `faible` |",
        ]
    )


def _aria_example() -> str:
    from medtune.tasks import get_task

    aria = get_task("aria")
    record = {"inclinaison_tronc": 9.2, "valgus_genou": 6.5, "adduction_hanche": 7.0, "longueur_foulée": 1.18,
              "pronation_pied": 4.1, "heel_strike_index": 0.45, "dorsiflexion_max": 11.0, "age": 41}  # fmt: skip
    return (
        f"System prompt: *{aria.system_prompt}*\n\nUser message:\n\n```text\n{aria.render_prompt(record)}\n```\n\n"
        f"Reference answer:\n\n```json\n{aria.reference_answer(record)}\n```"
    )


# Meaning of each headache label; a label added to the task without a line here fails the build.
_HEADACHE_LABELS = {
    "clarify": ("Pour préciser:", "no red flag, but a key fact is missing: the three standard questions"),
    "red_flag": (
        "Recommandation:",
        "a red flag is present: urgent brain MRI, the flags, the suspected cause, the source",
    ),
    "no_red_flag": ("Recommandation:", "all key facts known, no red flag: no urgent imaging"),
    "ambiguous": (
        "Recommandation:",
        "no red flag present but one is possible (hedged): urgent MRI to confirm",
    ),
}


def _headache_labels() -> str:
    from medtune.tasks.headache_rules import LABELS

    unknown = [label for label in LABELS if label not in _HEADACHE_LABELS]
    if unknown:
        raise RuntimeError(f"docs/hooks/reference.py: describe the headache label(s) {unknown}")
    rows = ["| label | answer starts with | when |", "|---|---|---|"]
    rows += [
        f"| `{label}` | `{_HEADACHE_LABELS[label][0]}` | {_HEADACHE_LABELS[label][1]} |" for label in LABELS
    ]
    return "\n".join(rows)


def _headache_questions() -> str:
    from medtune.tasks.headache_rules import QUESTIONS

    return "\n".join(f"{i}. {q}" for i, q in enumerate(QUESTIONS, start=1))


def _headache_red_flags() -> str:
    from medtune.tasks.headache_rules import AGE_FLAG, RED_FLAGS

    rows = ["| red flag | MRI looks for a suspicion… |", "|---|---|"]
    rows += [f"| {c.name} | {c.suspicion} |" for c in [*RED_FLAGS, AGE_FLAG]]
    return "\n".join(rows)


def _headache_balance() -> str:
    from medtune.tasks.headache_generate import WEIGHTS

    return "\n".join(
        ["| label | share |", "|---|---|", *(f"| `{k}` | {v:.0%} |" for k, v in WEIGHTS.items())]
    )


SNIPPETS = {
    "aria-schema": _aria_schema,
    "aria-signals": _aria_signals,
    "aria-confidence": _aria_confidence,
    "aria-example": _aria_example,
    "headache-labels": _headache_labels,
    "headache-questions": _headache_questions,
    "headache-red-flags": _headache_red_flags,
    "headache-balance": _headache_balance,
}
_MARKER = re.compile(r"<!-- generated: ([a-z0-9-]+) -->")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: replace each `<!-- generated: NAME -->` marker with its snippet."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in SNIPPETS:
            raise RuntimeError(
                f"{page.file.src_uri}: unknown generated snippet {name!r} (known: {', '.join(SNIPPETS)})"
            )
        return SNIPPETS[name]()

    return _MARKER.sub(replace, markdown)


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated pages as virtual files."""
    from mkdocs.structure.files import File

    # COLUMNS fixes argparse's wrapping so the CLI page is the same on every terminal.
    os.environ["COLUMNS"] = "100"
    for uri, func in PAGES.items():
        files.append(File.generated(config, uri, content=globals()[func]()))
    return files


if __name__ == "__main__":
    pages = {uri.split("/")[-1].removesuffix(".md"): func for uri, func in PAGES.items()}
    if len(sys.argv) != 2 or sys.argv[1] not in pages:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(pages)}}}")
    sys.stdout.write(globals()[pages[sys.argv[1]]]())
