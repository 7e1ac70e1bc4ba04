"""Atomic training checkpoints and resuming from the newest complete one.

The Hugging Face Trainer writes `checkpoint-N/` file by file; a run killed mid-save leaves a folder that
looks like a checkpoint but is not. Here every checkpoint is written into a hidden staging folder, gets a
completion marker last, then is renamed into place in one step. `--resume` only ever picks a folder
that has the marker.

    class MySFTTrainer(AtomicCheckpointMixin, SFTTrainer): ...
    path = latest_complete_checkpoint(out_dir / "checkpoints")   # None when there is nothing to resume
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

log = logging.getLogger(__name__)

COMPLETE_MARKER = "medtune-checkpoint-complete.json"
STAGING_PREFIX = ".staging-"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder, complete or not, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    complete = [path for _, path in list_checkpoints(Path(run_dir)) if is_complete(path)]
    return complete[-1] if complete else None


def clean_incomplete(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete leftovers of interrupted saves (staging folders, checkpoints without marker)."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for child in run_dir.iterdir():
        stale = child.name.startswith(STAGING_PREFIX) or (
            _CHECKPOINT_RE.match(child.name) and child.is_dir() and not is_complete(child)
        )
        if stale:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    if removed:
        log.warning("removed %d incomplete checkpoint folder(s) in %s", len(removed), run_dir)
    return removed


class AtomicCheckpointMixin:
    """Mix into a transformers/TRL Trainer (before it in the bases) to make checkpoints atomic."""

    _staging_dir: Path | None = None

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, the trainer writes into the staging folder.
        if self._staging_dir is not None:
            return str(self._staging_dir)
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        state = self.state  # type: ignore[attr-defined]
        args = self.args  # type: ignore[attr-defined]
        run_dir = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        run_dir.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=run_dir))
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_dir = None
        written = staging / name
        final = run_dir / name
        # The trainer recorded the best checkpoint under the staging path; point it at the final one.
        best = state.best_model_checkpoint
        if best and Path(best).parent == staging:
            state.best_model_checkpoint = str(final)
            if (written / TRAINER_STATE_NAME).is_file():
                state.save_to_json(str(written / TRAINER_STATE_NAME))
        marker = {"step": state.global_step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (written / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        if final.exists():  # the same step saved again (e.g. at the end of training)
            shutil.rmtree(final)
        os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        if args.should_save:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=args.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint,
                use_mtime=False,
            )
