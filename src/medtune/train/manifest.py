"""The run manifest: `runs/<name>/manifest.json`, what a run did and what it produced.

    manifest = Manifest.open(run_dir, recipe)          # existing manifest, or a new one
    if manifest.is_fresh("sft", key, [run_dir / "sft"]): ...   # done with the same inputs: skip
    manifest.start("sft", key); ...; manifest.complete("sft", metrics=..., outputs=...)

It holds the recipe as resolved, library versions, data file hashes, one record per step (status, key,
timings, metrics, outputs) and the run's status. Every change is written atomically, so a run killed at
any point leaves a manifest that says which steps finished. A step's `key` hashes its configuration and
its inputs (file hashes, the keys of the steps it reads from): a step whose key and outputs are unchanged
is skipped on re-run.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.config import Recipe, recipe_to_dict
from medtune.errors import ConfigError
from medtune.io import write_json

MANIFEST_NAME = "manifest.json"
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "xgrammar")


def step_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configuration dicts, file hashes, other keys)."""
    text = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "medtune": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Manifest:
    """A run's manifest, saved after every change. `data` is the plain JSON document."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.read_only = False  # set in the non-main processes of a multi-process run
        self._clock: dict[str, float] = {}

    @classmethod
    def open(cls, run_dir: Path, recipe: Recipe) -> Manifest:
        """The run's manifest with this recipe recorded, keeping the step records of earlier runs."""
        path = Path(run_dir) / MANIFEST_NAME
        data: dict[str, Any] = {"steps": {}}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}: not valid JSON ({exc}); delete it to start the run afresh"
                ) from None
            data.setdefault("steps", {})
        data.update(
            {
                "name": recipe.name,
                "status": "running",
                "started_at": _now(),
                "finished_at": None,
                "command": " ".join(sys.argv),
                "recipe": recipe_to_dict(recipe),
                "versions": library_versions(),
            }
        )
        data.setdefault("data_files", {})
        data.pop("error", None)
        manifest = cls(path, data)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run_dir: Path) -> Manifest | None:
        """The saved manifest of a run folder, or None when there is none."""
        path = Path(run_dir) / MANIFEST_NAME
        if not path.is_file():
            return None
        return cls(path, json.loads(path.read_text(encoding="utf-8")))

    def save(self) -> None:
        if not self.read_only:
            write_json(self.path, self.data)

    def reload(self) -> None:
        """Re-read the file (another process, the main one, has written it)."""
        self.data = json.loads(self.path.read_text(encoding="utf-8"))

    # -- steps ---------------------------------------------------------------------------------------

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        return self.data["steps"]

    def step(self, name: str) -> dict[str, Any]:
        return self.steps.get(name, {})

    def is_fresh(self, name: str, key: str, outputs: Sequence[Path] = ()) -> bool:
        """True when `name` completed with this key and its outputs are still on disk."""
        record = self.step(name)
        return (
            record.get("status") == "complete"
            and record.get("key") == key
            and all(Path(p).exists() for p in outputs)
        )

    def start(self, name: str, key: str) -> None:
        self._clock[name] = time.perf_counter()
        self.steps[name] = {"status": "running", "key": key, "started_at": _now()}
        self.save()

    def complete(self, name: str, **fields: Any) -> dict[str, Any]:
        record = self.steps[name]
        record.update(fields)
        record["status"] = "complete"
        record["finished_at"] = _now()
        record["seconds"] = round(time.perf_counter() - self._clock.pop(name, time.perf_counter()), 2)
        self.save()
        return record

    def skip(self, name: str) -> None:
        """Mark a fresh step as reused by this run (its record is kept as it was)."""
        self.steps[name]["reused"] = True
        self.save()

    def fail(self, name: str, error: BaseException) -> None:
        record = self.steps.setdefault(name, {})
        interrupted = isinstance(error, KeyboardInterrupt)
        record["status"] = "interrupted" if interrupted else "failed"
        record["error"] = str(error) or type(error).__name__
        record["finished_at"] = _now()
        self.data["status"] = record["status"]
        self.data["error"] = f"{name}: {record['error']}"
        self.data["finished_at"] = _now()
        self.save()

    def abort(self, error: BaseException) -> None:
        """The run stopped on `error` (a failed step has already recorded its own error)."""
        if self.data.get("status") == "running":
            self.data["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            self.data["error"] = str(error) or type(error).__name__
        self.data["finished_at"] = _now()
        self.save()

    def finish(self, status: str = "complete") -> None:
        self.data["status"] = status
        self.data["finished_at"] = _now()
        started = self.data.get("started_at")
        if started:
            elapsed = datetime.now(UTC) - datetime.fromisoformat(started)
            self.data["wall_seconds"] = round(elapsed.total_seconds(), 1)
        self.save()
