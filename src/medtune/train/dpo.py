"""Direct preference optimisation on (prompt, chosen, rejected) records, with TRL's DPOTrainer.

    result = train_dpo("runs/aria/sft", pairs, None, recipe.train.dpo, recipe.model,
                       Path("runs/aria/train/dpo"), seed=42)

The reference policy is the model the stage starts from (normally the merged SFT model):
- `full`: a frozen copy of it is kept beside the trained model;
- `lora` / `qlora`: no copy; TRL computes reference log-probabilities with the adapter disabled
  (the implicit reference), which costs no extra memory.
`beta` and `loss_type` (sigmoid, ipo, hinge, robust, ...; any TRL DPO loss) come from the stage config.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from medtune.config import ModelConfig, StageConfig
from medtune.errors import ConfigError
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

# Loss types TRL 1.x accepts (DPOConfig.loss_type); checked here so a typo fails before loading a model.
LOSS_TYPES = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
}  # fmt: skip


def _dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class MedtuneDPOTrainer(AtomicCheckpointMixin, DPOTrainer):
        """DPOTrainer with atomic checkpoints."""

    return MedtuneDPOTrainer


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    """A plain string becomes one message; a message list is kept (role/content only)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_dpo_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical preference records -> conversational rows for DPOTrainer."""
    return [
        {
            "prompt": _as_messages(r["prompt"], "user"),
            "chosen": _as_messages(r["chosen"], "assistant"),
            "rejected": _as_messages(r["rejected"], "assistant"),
        }
        for r in records
    ]


def train_dpo(
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
    """Preference-tune the model at `model_path`; returns the full model or the LoRA adapter folder."""
    check_hardware(stage, "train.dpo")
    for loss in stage.loss_types:
        if loss not in LOSS_TYPES:
            raise ConfigError(
                f"train.dpo.loss_type: unknown {loss!r}; known: {', '.join(sorted(LOSS_TYPES))}"
            )
    keys = ("prompt", "chosen", "rejected")
    require_records(train, "dpo", keys)
    if eval:
        require_records(eval, "dpo validation", keys)
    if model_kind(model_path, model_cfg) == "seq2seq":
        raise ConfigError("train.dpo: DPO needs a causal language model; this base is encoder-decoder (T5)")
    from datasets import Dataset
    from trl import DPOConfig

    out_dir = Path(out_dir)
    model, tokenizer = load_for_training(model_path, stage, model_cfg)
    ref_model = None
    if stage.method == "full":
        # The starting weights, frozen: the reference the policy is kept close to.
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    train_ds = Dataset.from_list(to_dpo_rows(train))
    eval_ds = Dataset.from_list(to_dpo_rows(eval)) if eval else None
    args = DPOConfig(
        **trainer_arguments(stage, out_dir, seed=seed, has_eval=eval_ds is not None, n_train=len(train_ds)),
        beta=stage.beta,
        loss_type=stage.loss_types,
        loss_weights=stage.loss_weights,
        max_length=stage.max_length,
    )
    trainer = _dpo_trainer_class()(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=stage_callbacks(stage, out_dir, "dpo", eval_ds is not None) + list(callbacks or []),
    )
    warn_if_truncated(trainer.train_dataset, stage.max_length, "dpo")
    return run_stage(trainer, out_dir, label="dpo", resume=resume, keep_checkpoints=keep_checkpoints)
