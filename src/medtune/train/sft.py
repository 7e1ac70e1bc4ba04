"""Supervised fine-tuning on conversations, with TRL's SFTTrainer.

    result = train_sft("runs/aria/base", train_records, eval_records, recipe.train.sft, recipe.model,
                       Path("runs/aria/train/sft"), seed=42)

Loss is computed on assistant tokens only, the end-of-turn token included, so the model learns to answer
and to stop. Two ways, chosen from the tokenizer's chat template:
- the template marks assistant turns with `{% generation %}` (medtune's templates do; TRL also knows
  training variants of many hub templates): TRL's `assistant_only_loss` masks every assistant turn;
- otherwise each conversation becomes prompt (everything before the last assistant turn) + completion
  (that turn) and TRL's `completion_only_loss` masks the prompt.
`packing=True` packs examples with TRL's best-fit-decreasing packing; the position ids restart at each
example and transformers turns them into a block-diagonal attention mask, so packed examples never see
each other. Encoder-decoder models (T5) go to `medtune.train.seq2seq`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medtune.config import ModelConfig, StageConfig
from medtune.errors import DataError
from medtune.train.checkpoints import AtomicCheckpointMixin
from medtune.train.common import (
    StageResult,
    require_records,
    run_stage,
    stage_callbacks,
    trainer_arguments,
    warn_if_truncated,
)
from medtune.train.models import check_hardware, load_for_training, model_kind

log = logging.getLogger(__name__)


def sft_trainer_class() -> type:
    from trl import SFTTrainer

    class MedtuneSFTTrainer(AtomicCheckpointMixin, SFTTrainer):
        """SFTTrainer with atomic checkpoints."""

    return MedtuneSFTTrainer


def loss_mode(tokenizer: Any) -> str:
    """'assistant' when the chat template can mark assistant turns, else 'completion'."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if template and has_generation_markers(template):
        return "assistant"
    try:
        get_training_chat_template(tokenizer)  # TRL ships a marked variant of this template
    except ValueError:
        return "completion"
    return "assistant"


def _last_assistant(messages: list[dict[str, str]], where: str) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    raise DataError(f"{where}: the conversation has no assistant turn to learn from")


def to_sft_rows(records: list[dict[str, Any]], mode: str, name: str = "sft") -> list[dict[str, Any]]:
    """Canonical conversations -> rows for SFTTrainer: {"messages"} or {"prompt", "completion"}."""
    rows = []
    dropped_turns = 0
    for i, record in enumerate(records):
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        last = _last_assistant(messages, f"{name} record {i}")
        if mode == "assistant":
            rows.append({"messages": messages[: last + 1]})
        else:
            dropped_turns += sum(m["role"] == "assistant" for m in messages[:last])
            rows.append({"prompt": messages[:last], "completion": [messages[last]]})
    if dropped_turns:
        log.warning(
            "%s: the chat template has no {%% generation %%} markers: only the last assistant turn of each "
            "conversation carries loss (%d earlier assistant turns are context only)",
            name,
            dropped_turns,
        )
    return rows


def _dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(rows)


def build_sft_trainer(
    model_path: str | Path,
    train: list[dict[str, Any]],
    eval: list[dict[str, Any]] | None,
    stage: StageConfig,
    model_cfg: ModelConfig,
    out_dir: Path,
    *,
    seed: int,
    callbacks: list[Any] | None = None,
) -> Any:
    """The configured SFT trainer, its datasets tokenised and masked, not yet trained."""
    require_records(train, "sft", ("messages",))
    if eval:
        require_records(eval, "sft validation", ("messages",))
    from trl import SFTConfig

    out_dir = Path(out_dir)
    model, tokenizer = load_for_training(model_path, stage, model_cfg)
    mode = loss_mode(tokenizer)
    train_ds = _dataset(to_sft_rows(train, mode))
    eval_ds = _dataset(to_sft_rows(eval, mode, "sft validation")) if eval else None
    args = SFTConfig(
        **trainer_arguments(stage, out_dir, seed=seed, has_eval=eval_ds is not None, n_train=len(train_ds)),
        max_length=stage.max_length,
        packing=stage.packing,
        assistant_only_loss=mode == "assistant",
        completion_only_loss=True if mode == "completion" else None,
    )
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=stage_callbacks(stage, out_dir, "sft", eval_ds is not None) + list(callbacks or []),
    )
    if not stage.packing:  # packing chunks long examples on purpose
        warn_if_truncated(trainer.train_dataset, stage.max_length, "sft", n_given=len(train_ds))
    return trainer


def train_sft(
    model_path: str | Path,
    train: list[dict[str, Any]],
    eval: list[dict[str, Any]] | None,
    stage: StageConfig,
    model_cfg: ModelConfig,
    out_dir: Path,
    *,
    seed: int,
    resume: bool = False,
    callbacks: list[Any] | None = None,
    keep_checkpoints: bool = False,
) -> StageResult:
    """Fine-tune on conversation records; returns the full model or the LoRA adapter folder."""
    check_hardware(stage, "train.sft")
    if model_kind(model_path, model_cfg) == "seq2seq":
        from medtune.train.seq2seq import train_seq2seq

        return train_seq2seq(
            model_path, train, eval, stage, model_cfg, out_dir, seed=seed, resume=resume,
            callbacks=callbacks, keep_checkpoints=keep_checkpoints,
        )  # fmt: skip
    out_dir = Path(out_dir)
    trainer = build_sft_trainer(
        model_path, train, eval, stage, model_cfg, out_dir, seed=seed, callbacks=callbacks
    )
    return run_stage(trainer, out_dir, label="sft", resume=resume, keep_checkpoints=keep_checkpoints)
