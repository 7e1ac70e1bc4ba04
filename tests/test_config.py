"""Recipe loading, overrides and validation (medtune.config)."""

from pathlib import Path

import pytest

from medtune.config import apply_overrides, load_recipe, validate_recipe_file
from medtune.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_overrides_parse_yaml_values() -> None:
    data = apply_overrides(
        {"train": {"sft": {}}}, ["train.sft.lora.r=16", "train.sft.packing=true", "seed=7"]
    )
    assert data == {"train": {"sft": {"lora": {"r": 16}, "packing": True}}, "seed": 7}


def test_override_reaches_recipe(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\ntask: aria\n")
    recipe = load_recipe(p, ["train.sft.lora.r=8", "train.sft.method=lora"])
    assert recipe.train.sft.lora.r == 8
    assert recipe.train.sft.method == "lora"


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "name: x\ntask: aria\ntrain:\n  sft:\n    lerning_rate: 0.1\n    batch_size: zero\n"
        "data:\n  sft: missing.jsonl\n",
    )
    problems = validate_recipe_file(p)
    joined = "\n".join(problems)
    assert "train.sft.lerning_rate: unknown key; did you mean 'learning_rate'?" in joined
    assert "train.sft.batch_size" in joined and "'zero'" in joined
    # Schema errors come first; the file check runs once the schema is valid.
    problems = validate_recipe_file(p, ["train.sft.lerning_rate=", "train.sft.batch_size=4"])
    assert any("lerning_rate" in q for q in problems)


def test_missing_dataset_fails_validation(tmp_path: Path) -> None:
    p = write(
        tmp_path, "name: x\ntrain:\n  stages: [sft]\ndata:\n  sft: nowhere/train.jsonl\n  generate: null\n"
    )
    problems = validate_recipe_file(p)
    assert problems == ["data.sft: file not found: nowhere/train.jsonl"]
    with pytest.raises(ConfigError, match=r"nowhere/train\.jsonl"):
        load_recipe(p)


def test_unknown_task_and_qlora_on_embedded(tmp_path: Path) -> None:
    p = write(tmp_path, "name: x\ntask: arai\ntrain:\n  sft:\n    method: qlora\n")
    problems = validate_recipe_file(p)
    assert any("did you mean 'aria'" in q for q in problems)
    assert any(q.startswith("train.sft.method: qlora") for q in problems)
