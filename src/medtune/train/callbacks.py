"""Trainer callbacks and plots shared by every stage: progress, TensorBoard, loss curve.

- `progress_callbacks(out_dir)`: a rich live panel on a terminal (TRL's RichProgressCallback: bar with
  ETA, latest loss and learning rate), plain log lines otherwise (`step 40/600 loss 1.234 lr 2.0e-03
  eta 3m10s`), plus TensorBoard event files in `out_dir/tensorboard/`.
- `plot_loss_curve(log_history, path)`: train and eval loss against the step, as a PNG.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medtune.io import atomic_path

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressLogCallback(TrainerCallback):
    """One log line per logging step with loss, learning rate and the estimated time left."""

    def __init__(self, label: str = "train") -> None:
        self.label = label
        self._start_time = 0.0
        self._start_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start_time = time.monotonic()
        self._start_step = state.global_step  # > 0 when resuming

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        done = state.global_step - self._start_step
        elapsed = time.monotonic() - self._start_time
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else float("nan")
        parts = [f"{self.label} step {state.global_step}/{state.max_steps}"]
        for key, fmt in (
            ("loss", ".4f"),
            ("eval_loss", ".4f"),
            ("learning_rate", ".2e"),
            ("rewards/margins", ".3f"),
        ):
            if key in logs:
                parts.append(f"{key} {logs[key]:{fmt}}")
        if len(parts) == 1:
            return  # e.g. the end-of-training summary: nothing to show per step
        if done > 0 and state.global_step < state.max_steps:
            parts.append(f"eta {_duration(eta)}")
        log.info("  ".join(parts))


def progress_callbacks(out_dir: Path, label: str = "train") -> list[TrainerCallback]:
    """Progress display (rich on a terminal, log lines elsewhere) and TensorBoard logging."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    callbacks: list[TrainerCallback] = [ProgressLogCallback(label)]
    if sys.stderr.isatty():
        from trl.trainer.callbacks import RichProgressCallback

        callbacks.append(RichProgressCallback())
    callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out_dir / "tensorboard"))))
    return callbacks


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str = "loss") -> Path | None:
    """Train (and eval) loss against the optimiser step; None when nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="validation", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
