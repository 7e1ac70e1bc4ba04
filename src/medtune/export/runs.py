"""Find what to export from what the user names: a run folder, a model folder or an adapter folder.

    with model_folder("runs/aria") as path:      # the run's final merged model (runs/aria/dpo)
        ...
    with model_folder("runs/aria/sft-adapter") as path:   # an adapter: merged into its base first
        ...

A run folder is recognised by its `manifest.json` (written by `medtune run`); its final model is the
folder of the last completed stage of the recipe's `train.stages` (`runs/aria/dpo`). An adapter folder (`adapter_config.json`) is fused into its base with
`medtune.train.merge.merge_adapter` into a temporary folder that disappears afterwards.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.errors import ModelError

STAGE_ORDER = ("pt", "sft", "dpo")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest.json, or ModelError naming the folder."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{run_dir}: not a run folder (no manifest.json); run `medtune run RECIPE` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def final_model_dir(run_dir: str | Path) -> Path:
    """The model a run ends with: the last completed stage (in the recipe's order) that has a model."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    stages = (manifest.get("recipe") or {}).get("train", {}).get("stages") or list(STAGE_ORDER)
    steps = manifest.get("steps") or {}
    for stage in reversed(stages):
        record = steps.get(stage) or {}
        if record.get("status") != "complete":
            continue
        folder = run_dir / record.get("output", stage)
        if is_model_dir(folder) or is_adapter_dir(folder):
            return folder
    raise ModelError(
        f"{run_dir}: the run has no trained model yet (no completed {'/'.join(stages)} stage); "
        "run `medtune run RECIPE` first"
    )


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder `path` is (or is a model folder inside), or None."""
    p = Path(path).expanduser().resolve()
    for candidate in (p, p.parent):
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def resolve(path: str | Path) -> Path:
    """A model or adapter folder for `path` (a run folder resolves to its final model)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{path}: no such file or folder")
    if p.is_dir() and not (is_model_dir(p) or is_adapter_dir(p)) and (p / "manifest.json").is_file():
        return final_model_dir(p)
    if p.is_dir() and (is_model_dir(p) or is_adapter_dir(p)):
        return p
    raise ModelError(f"{path}: expected a run folder, a model folder (config.json) or an adapter folder")


@contextlib.contextmanager
def model_folder(path: str | Path) -> Iterator[Path]:
    """Yield a full model folder for `path`, merging an adapter into its base in a temporary folder."""
    folder = resolve(path)
    if is_model_dir(folder):
        yield folder
        return
    from medtune.train.merge import merge_adapter

    with tempfile.TemporaryDirectory(prefix="medtune-merged-") as tmp:
        yield merge_adapter(folder, Path(tmp) / folder.name)
