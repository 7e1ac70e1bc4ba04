"""Fine-tuning encoder-decoder models (T5 / Flan-T5), e.g. the seed's LoRA r=8, alpha=32 on q and v.

    result = train_seq2seq("google/flan-t5-xl", records, None, stage, model_cfg, out_dir, seed=42)

`train_sft` sends T5-family bases here on its own. Conversations become (source, target) text pairs:
the source is the system and user turns joined by blank lines (`seq2seq_prompt`, which serving must use
too), the target is the last assistant turn followed by the end-of-sequence token. Trained with
transformers' Seq2SeqTrainer; checkpoints, resume, progress and outputs are those of every stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.config import ModelConfig, StageConfig
from medtune.errors import DataError
from medtune.train.checkpoints import AtomicCheckpointMixin
from medtune.train.common import StageResult, require_records, run_stage, stage_callbacks, trainer_arguments
from medtune.train.models import check_hardware, load_for_training


def seq2seq_prompt(messages: list[dict[str, str]]) -> str:
    """The encoder input for a conversation: every non-assistant turn before the answer, in order."""
    return "\n\n".join(m["content"] for m in messages if m["role"] != "assistant")


def to_pairs(records: list[dict[str, Any]], name: str) -> list[dict[str, str]]:
    pairs = []
    for i, record in enumerate(records):
        messages = record["messages"]
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{name} record {i}: the conversation has no assistant turn to learn from")
        pairs.append({"source": seq2seq_prompt(messages[:last]), "target": messages[last]["content"]})
    return pairs


def _tokenize(pairs: list[dict[str, str]], tokenizer: Any, max_length: int) -> Any:
    from datasets import Dataset

    # T5 tokenizers end every sequence with </s>; a tokenizer that does not gets it appended here, so
    # the decoder learns to stop.
    adds_eos = tokenizer("x")["input_ids"][-1:] == [tokenizer.eos_token_id]

    def encode(example: dict[str, str]) -> dict[str, list[int]]:
        source = tokenizer(example["source"], max_length=max_length, truncation=True)
        target = tokenizer(text_target=example["target"], max_length=max_length, truncation=True)["input_ids"]
        if not adds_eos:
            target = [*target[: max_length - 1], tokenizer.eos_token_id]
        return {
            "input_ids": source["input_ids"],
            "attention_mask": source["attention_mask"],
            "labels": target,
        }

    return Dataset.from_list(pairs).map(encode, remove_columns=["source", "target"])


def train_seq2seq(
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
    """Fine-tune an encoder-decoder model on conversation records (full or LoRA)."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    check_hardware(stage, "train.sft")
    require_records(train, "sft", ("messages",))
    if eval:
        require_records(eval, "sft validation", ("messages",))
    out_dir = Path(out_dir)
    model, tokenizer = load_for_training(model_path, stage, model_cfg)
    train_ds = _tokenize(to_pairs(train, "sft"), tokenizer, stage.max_length)
    eval_ds = _tokenize(to_pairs(eval, "sft validation"), tokenizer, stage.max_length) if eval else None
    args = Seq2SeqTrainingArguments(
        **trainer_arguments(stage, out_dir, seed=seed, has_eval=eval_ds is not None, n_train=len(train_ds)),
    )

    class MedtuneSeq2SeqTrainer(AtomicCheckpointMixin, Seq2SeqTrainer):
        """Seq2SeqTrainer with atomic checkpoints."""

    trainer = MedtuneSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        callbacks=stage_callbacks(stage, out_dir, "sft", eval_ds is not None) + list(callbacks or []),
    )
    return run_stage(trainer, out_dir, label="sft", resume=resume, keep_checkpoints=keep_checkpoints)
