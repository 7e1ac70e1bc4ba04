"""The generated documentation (docs/hooks/reference.py) says what the code accepts, key for key."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel

from medtune.cli import build_parser
from medtune.config import Recipe, StageConfig

HOOK = Path(__file__).resolve().parents[2] / "docs" / "hooks" / "reference.py"


@pytest.fixture(scope="module")
def ref() -> Any:
    spec = importlib.util.spec_from_file_location("docs_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) else None
        nested = [
            a
            for a in getattr(field.annotation, "__args__", ())
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if sub is not None and issubclass(sub, BaseModel):
            keys += leaf_keys(sub, f"{prefix}{name}.")
        elif nested:
            keys += leaf_keys(nested[0], f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_recipe_key_is_documented_with_its_real_default(ref: Any) -> None:
    page = ref.recipe_page()
    keys = leaf_keys(Recipe)
    assert len(keys) > 50
    for key in keys:
        assert f"| `{key}` |" in page, key
    # train.dpo's defaults differ from a bare stage's: the page shows the recipe's real ones.
    rows = {line.split(" | ")[0]: line for line in page.splitlines() if line.startswith("| `")}
    dpo_lr, bare_lr = Recipe(name="x").train.dpo.learning_rate, StageConfig().learning_rate
    assert dpo_lr != bare_lr
    assert ref._show(dpo_lr) in rows["| `train.dpo.learning_rate`"]
    assert ref._show(bare_lr) in rows["| `train.sft.learning_rate`"]
    assert "`false`" in rows["| `train.pt.enabled`"]


def test_every_command_is_in_the_cli_page(ref: Any) -> None:
    page = ref.cli_page()
    for name in ref._subcommands(build_parser()):
        assert f"## `medtune {name}`" in page or f"### `medtune {name}`" in page, name


def test_markers_are_replaced_and_an_unknown_one_fails_the_build(ref: Any) -> None:
    page = SimpleNamespace(file=SimpleNamespace(src_uri="tasks.md"))
    out = ref.on_page_markdown("before\n<!-- generated: aria-signals -->\nafter", page, None, None)
    assert "| Lombalgie mécanique | `inclinaison_tronc` > 7° |" in out
    assert "`heel_strike_index` > 0.7 and `dorsiflexion_max` > 15°" in out
    with pytest.raises(RuntimeError, match="unknown generated snippet 'nope'"):
        ref.on_page_markdown("<!-- generated: nope -->", page, None, None)


def test_every_snippet_renders(ref: Any) -> None:
    for name, render in ref.SNIPPETS.items():
        assert render().strip(), name
