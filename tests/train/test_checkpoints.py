"""Checkpoints are atomic and a killed run resumes to the same end as an uninterrupted one."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import TrainerCallback

from fixtures_models import tiny_chat_records
from medtune.config import ModelConfig, StageConfig
from medtune.train.checkpoints import COMPLETE_MARKER, clean_incomplete, latest_complete_checkpoint
from medtune.train.sft import train_sft

STAGE = {
    "logging_steps": 1,
    "max_steps": 8,
    "save_steps": 2,
    "save_total_limit": 2,
    "learning_rate": 5e-3,
    "batch_size": 4,
}


class Crash(RuntimeError):
    pass


class CrashAfterSave(TrainerCallback):
    """Simulates the process dying right after the checkpoint of step `step` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"killed after step {state.global_step}")


def _step_losses(out_dir) -> dict[int, float]:
    history = json.loads((out_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_killed_run_resumes_to_the_same_end(tiny_model_dir, tmp_path):
    records = tiny_chat_records(24)
    stage = StageConfig(**STAGE)
    whole = train_sft(tiny_model_dir, records, None, stage, ModelConfig(), tmp_path / "whole", seed=0)

    out = tmp_path / "killed"
    with pytest.raises(Crash):
        train_sft(
            tiny_model_dir, records, None, stage, ModelConfig(), out, seed=0, callbacks=[CrashAfterSave(4)]
        )
    ckpt = latest_complete_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "checkpoint-4" and (ckpt / COMPLETE_MARKER).is_file()
    assert not (out / "model").exists()

    resumed = train_sft(tiny_model_dir, records, None, stage, ModelConfig(), out, seed=0, resume=True)
    assert resumed.metrics["global_step"] == whole.metrics["global_step"] == 8
    # Same optimizer, scheduler, RNG and data position: every step's loss matches the uninterrupted run
    # (steps 1-4 come from the checkpoint's history, 5-8 were trained after the resume).
    after, reference = _step_losses(out), _step_losses(tmp_path / "whole")
    assert sorted(after) == sorted(reference) == list(range(1, 9))
    for step in range(5, 9):
        assert after[step] == pytest.approx(reference[step], rel=1e-3)


def test_resume_ignores_incomplete_checkpoints(tiny_model_dir, tmp_path):
    records = tiny_chat_records(16)
    stage = StageConfig(**STAGE)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train_sft(
            tiny_model_dir, records, None, stage, ModelConfig(), out, seed=0, callbacks=[CrashAfterSave(2)]
        )
    ckpts = out / "checkpoints"
    # A save cut short: a later checkpoint folder without its completion marker, and a staging leftover.
    half = ckpts / "checkpoint-6"
    shutil.copytree(ckpts / "checkpoint-2", half)
    (half / COMPLETE_MARKER).unlink()
    (half / "model.safetensors").write_bytes(b"truncated")
    (ckpts / ".staging-abc").mkdir()
    assert latest_complete_checkpoint(ckpts).name == "checkpoint-2"

    # Loading the truncated checkpoint-6 would fail: finishing proves the resume started from checkpoint-2.
    result = train_sft(tiny_model_dir, records, None, stage, ModelConfig(), out, seed=0, resume=True)
    assert result.metrics["global_step"] == 8
    assert (out / "model" / "model.safetensors").stat().st_size > 1000


def test_clean_incomplete_keeps_complete_ones(tmp_path):
    done = tmp_path / "checkpoint-3"
    done.mkdir()
    (done / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / ".staging-x").mkdir()
    clean_incomplete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert latest_complete_checkpoint(tmp_path) == done
    assert latest_complete_checkpoint(tmp_path / "missing") is None
