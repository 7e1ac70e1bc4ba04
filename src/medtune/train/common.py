"""What every training stage shares: the result type, trainer arguments from a recipe stage, the run loop.

A stage module (sft.py, dpo.py, pt.py, seq2seq.py) turns records into a dataset, builds its TRL or
transformers trainer with `trainer_arguments(...)`, and hands it to `run_stage(...)`, which resumes from
the newest complete checkpoint when asked, trains, evaluates, saves the result atomically and writes
`metrics.json` and `loss_curve.png`. Stage folder layout:

    out_dir/
      model/ or adapter/     the result (full model, or LoRA adapter), HF format + tokenizer
      checkpoints/           checkpoint-N/ (atomic, with a completion marker); removed after success
      tensorboard/           event files (`tensorboard --logdir out_dir/tensorboard`)
      metrics.json, loss_curve.png
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medtune.config import StageConfig
from medtune.errors import DataError
from medtune.io import atomic_dir, write_json
from medtune.train.callbacks import plot_loss_curve, progress_callbacks
from medtune.train.checkpoints import clean_incomplete, latest_complete_checkpoint
from medtune.train.models import cuda_available, resolve_dtype, save_tokenizer

log = logging.getLogger(__name__)

_OPTIMIZERS = {
    "adamw": "adamw_torch",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adamw_8bit": "adamw_bnb_8bit",
    "sgd": "sgd",
    "adafactor": "adafactor",
}


@dataclass
class StageResult:
    """What a stage produced. `output_dir` is a full model folder, or an adapter folder (`is_adapter`)."""

    output_dir: Path
    is_adapter: bool
    metrics: dict[str, float] = field(default_factory=dict)
    loss_curve: Path | None = None


def require_records(records: list[dict[str, Any]] | None, stage: str, keys: tuple[str, ...]) -> None:
    """Raise DataError naming the first record that lacks one of `keys`."""
    if not records:
        raise DataError(f"{stage}: the training set is empty")
    for i, record in enumerate(records):
        missing = [k for k in keys if k not in record]
        if missing:
            raise DataError(
                f"{stage}: record {i} lacks {', '.join(missing)} (expected keys {', '.join(keys)}, "
                f"found {', '.join(sorted(record)) or 'none'})"
            )


def trainer_arguments(
    stage: StageConfig, out_dir: Path, *, seed: int, has_eval: bool, n_train: int | None = None
) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig, DPOConfig and Seq2SeqTrainingArguments."""
    dtype = resolve_dtype(stage.precision)
    if dtype == torch.bfloat16 and not cuda_available() and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("precision=bf16: this CPU has no native bf16 (avx512_bf16 or AMX); fp32 may be faster")
    save_steps = stage.save_steps
    early = bool(stage.early_stopping_patience) and has_eval
    if stage.early_stopping_patience and not has_eval:
        log.warning("early_stopping_patience is set but there is no validation set: early stopping is off")
    if early and save_steps % stage.eval_steps:
        # Keeping the best checkpoint needs a save at each evaluation step that may be the best.
        save_steps = stage.eval_steps * max(1, round(save_steps / stage.eval_steps))
        log.info(
            "save_steps %d -> %d (a multiple of eval_steps, for early stopping)", stage.save_steps, save_steps
        )
    warmup: float = stage.warmup_steps if stage.warmup_steps else stage.warmup_ratio
    kwargs: dict[str, Any] = {
        "output_dir": str(out_dir / "checkpoints"),
        "per_device_train_batch_size": stage.batch_size,
        "per_device_eval_batch_size": stage.batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "learning_rate": stage.learning_rate,
        "num_train_epochs": stage.num_epochs,
        "max_steps": stage.max_steps,
        "lr_scheduler_type": stage.scheduler,
        "warmup_steps": warmup,  # a float < 1 is a ratio of the total steps
        "optim": _OPTIMIZERS[stage.optimizer],
        "weight_decay": stage.weight_decay,
        "max_grad_norm": stage.max_grad_norm,
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "activation_checkpointing": stage.gradient_checkpointing,  # transformers 5 name of the option
        "seed": seed,
        "data_seed": seed,
        "logging_steps": stage.logging_steps,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": stage.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": stage.eval_steps,
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if early else None,
        "greater_is_better": False if early else None,
        "restore_callback_states_from_checkpoint": early,  # early-stopping patience survives a resume
        "report_to": "none",  # TensorBoard is attached explicitly (see callbacks.py), nothing else
        "disable_tqdm": True,  # progress comes from our callbacks
        "dataloader_num_workers": 0,  # CPU: worker processes cost more than they save on small batches
        "use_cpu": not cuda_available(),
        "save_only_model": False,  # optimizer, scheduler and RNG are needed to resume exactly
    }
    if n_train is not None and stage.max_steps <= 0:
        per_step = stage.batch_size * stage.gradient_accumulation_steps
        log.info(
            "%d examples, ~%d optimiser steps", n_train, math.ceil(n_train / per_step * stage.num_epochs)
        )
    return kwargs


def warn_if_truncated(dataset: Any, max_length: int | None, label: str, n_given: int | None = None) -> int:
    """Log how many examples `max_length` cuts (their ends: the answers); return that count.

    SFT datasets come truncated from TRL, which also drops the examples left with no answer token at all
    (`n_given` - len(dataset) of them); an example at exactly `max_length` tokens counts as cut. DPO
    datasets keep prompt, chosen and rejected ids apart and are cut in the collator."""
    if dataset is None or not max_length:
        return 0
    columns = dataset.column_names
    if "chosen_ids" in columns:
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                   zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)]  # fmt: skip
        cut = sum(n > max_length for n in lengths)
    elif "input_ids" in columns:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        cut = sum(n >= max_length for n in lengths)
    else:
        return 0
    total = max(n_given or 0, len(lengths))
    dropped = total - len(lengths)
    if cut or dropped:
        log.warning(
            "%s: %d of %d examples are longer than train.%s.max_length=%d tokens and lose their end (the "
            "answer and its end-of-turn token)%s: raise max_length",
            label, cut + dropped, total, label, max_length,
            f"; {dropped} of them had nothing left to learn from and were dropped" if dropped else "",
        )  # fmt: skip
    return cut + dropped


def stage_callbacks(stage: StageConfig, out_dir: Path, label: str, has_eval: bool) -> list[Any]:
    from transformers import EarlyStoppingCallback

    callbacks = progress_callbacks(out_dir, label)
    if stage.early_stopping_patience and has_eval:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=stage.early_stopping_patience))
    return callbacks


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _final_eval(trainer: Any) -> dict[str, float]:
    """Validation metrics of the final model, reusing the trainer's last evaluation when it is current."""
    state = trainer.state
    evals = [h for h in state.log_history if "eval_loss" in h]
    current = evals and evals[-1].get("step") == state.global_step and not trainer.args.load_best_model_at_end
    values = evals[-1] if current else trainer.evaluate()
    return {k: float(v) for k, v in values.items() if k.startswith("eval_") and isinstance(v, int | float)}


def run_stage(
    trainer: Any,
    out_dir: Path,
    *,
    label: str,
    resume: bool = False,
    keep_checkpoints: bool = False,
) -> StageResult:
    """Train (resuming if asked and possible), evaluate, save the result atomically, write metrics."""
    ckpt_dir = Path(trainer.args.output_dir)
    resume_from = None
    if resume:
        clean_incomplete(ckpt_dir)
        resume_from = latest_complete_checkpoint(ckpt_dir)
        if resume_from is None:
            log.warning(
                "%s: --resume but no complete checkpoint in %s: starting from step 0", label, ckpt_dir
            )
        else:
            log.info("%s: resuming from %s", label, resume_from)
    elif ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a fresh run must not mix with an older run's checkpoints

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; ProgressLogCallback logs instead
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics: dict[str, float] = {
        "train_loss": float(result.training_loss),
        "global_step": float(result.global_step),
        "train_runtime_s": round(time.monotonic() - started, 2),
    }
    for key, value in result.metrics.items():
        if key not in ("train_loss", "train_runtime") and isinstance(value, int | float):
            metrics[key] = float(value)
    if trainer.eval_dataset is not None:
        metrics.update(_final_eval(trainer))
    # The latest logged values of stage-specific metrics (DPO reward margins and accuracies).
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith("rewards/") and isinstance(value, int | float):
                metrics[f"last_{key.replace('/', '_')}"] = float(value)

    is_adapter = _is_peft(trainer.model)
    final = out_dir / ("adapter" if is_adapter else "model")
    with atomic_dir(final) as tmp:
        trainer.save_model(str(tmp))  # adapter only for PEFT, full weights otherwise
        save_tokenizer(trainer.processing_class, tmp)
    write_json(out_dir / "metrics.json", metrics)
    curve = plot_loss_curve(trainer.state.log_history, out_dir / "loss_curve.png", title=f"{label} loss")
    write_json(out_dir / "log_history.json", trainer.state.log_history)
    if not keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    log.info(
        "%s: done in %.0fs, train_loss %.4f -> %s",
        label,
        metrics["train_runtime_s"],
        metrics["train_loss"],
        final,
    )
    return StageResult(output_dir=final, is_adapter=is_adapter, metrics=metrics, loss_curve=curve)
