"""Export fixtures: the tiny embedded model converted to GGUF once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ggufs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"f16": path, "q8_0": path} for `tiny_model_dir` (llama-cpp-python required)."""
    pytest.importorskip("llama_cpp")
    from medtune.export.gguf import export_ggufs

    out = tmp_path_factory.mktemp("gguf")
    return {f.quant: f.path for f in export_ggufs(tiny_model_dir, out, ["f16", "q8_0"], name="tiny")}


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# recipes/aria.yaml shrunk to seconds: tiny model, a few dozen examples, a few steps.
TINY_ARIA = [
    "model.embedded.size=tiny",
    "data.generate.sft=48",
    "data.generate.dpo=24",
    "data.generate.test=8",
    "train.sft.method=lora",  # merged after training; the adapter stays in train/sft/adapter
    "train.sft.max_steps=4",
    "train.sft.batch_size=8",
    "train.sft.eval_steps=4",
    "train.sft.save_steps=4",
    "train.dpo.max_steps=2",
    "train.dpo.batch_size=4",
    "train.dpo.eval_steps=2",
    "train.dpo.save_steps=2",
    "serve.max_batch_size=8",
    "export.hub.model_repo=medtune-test/aria-ft-dpo",
    "export.hub.dataset_repo=medtune-test/aria-datasets",
]


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny aria run folder (data, embedded model, sft, dpo, eval). Treat as read-only."""
    from medtune.config import load_recipe
    from medtune.train.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(RECIPES / "aria.yaml", [*TINY_ARIA, f"output_dir={out}"])
    return run_pipeline(recipe, recipe_dir=RECIPES).run_dir
