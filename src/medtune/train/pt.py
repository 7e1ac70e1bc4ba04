"""Continued pretraining on raw text, with TRL's SFTTrainer in language-modelling mode.

    result = train_pt("runs/mygpt/base", [{"text": "..."}, ...], None, recipe.train.pt, recipe.model,
                      Path("runs/mygpt/train/pt"), seed=42)

Every document gets the end-of-sequence token, then all of them are concatenated and cut into blocks
of `max_length` tokens (TRL's "wrapped" packing, the classic causal-LM recipe: no padding, every
token trains). Loss is on every token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.config import ModelConfig, StageConfig
from medtune.errors import ConfigError, DataError
from medtune.train.common import StageResult, require_records, run_stage, stage_callbacks, trainer_arguments
from medtune.train.models import check_hardware, load_for_training, model_kind
from medtune.train.sft import sft_trainer_class


def _text_rows(records: list[dict[str, Any]], name: str) -> list[dict[str, str]]:
    rows = []
    for i, record in enumerate(records):
        text = record["text"]
        if not isinstance(text, str):
            raise DataError(f"{name}: record {i}: 'text' must be a string, found {type(text).__name__}")
        if text.strip():
            rows.append({"text": text})
    if not rows:
        raise DataError(f"{name}: every text is empty")
    return rows


def train_pt(
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
    """Continue pretraining on {"text": ...} records; returns the full model or the LoRA adapter folder."""
    check_hardware(stage, "train.pt")
    require_records(train, "pt", ("text",))
    if eval:
        require_records(eval, "pt validation", ("text",))
    if model_kind(model_path, model_cfg) == "seq2seq":
        raise ConfigError(
            "train.pt: continued pretraining here is causal-LM; this base is encoder-decoder (T5)"
        )
    from datasets import Dataset
    from trl import SFTConfig

    out_dir = Path(out_dir)
    model, tokenizer = load_for_training(model_path, stage, model_cfg)
    train_ds = Dataset.from_list(_text_rows(train, "pt"))
    eval_ds = Dataset.from_list(_text_rows(eval, "pt validation")) if eval else None
    args = SFTConfig(
        **trainer_arguments(stage, out_dir, seed=seed, has_eval=eval_ds is not None, n_train=len(train_ds)),
        max_length=stage.max_length,
        packing=True,
        packing_strategy="wrapped",
        completion_only_loss=False,
        dataset_text_field="text",
    )
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=stage_callbacks(stage, out_dir, "pt", eval_ds is not None) + list(callbacks or []),
    )
    return run_stage(trainer, out_dir, label="pt", resume=resume, keep_checkpoints=keep_checkpoints)
