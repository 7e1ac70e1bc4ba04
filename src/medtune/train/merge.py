"""Fuse a LoRA adapter into its base: a standalone model folder any tool can load.

    merge_adapter("runs/aria/train/sft/adapter", "runs/aria/sft")          # base read from the adapter
    merge_adapter("adapters/derm", "models/flan-t5-derm", base_model="google/flan-t5-xl")

The result holds safetensors weights, the tokenizer (with `tokenizer.model` when the base has one) and
the chat template, written atomically. QLoRA adapters are merged into the base loaded in 16/32-bit, never
into 4-bit weights: merging into a quantised matrix would round the update away. A base that is itself
stored pre-quantised (bitsandbytes) is dequantised first, which needs the GPU that could load it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medtune.errors import HardwareError, ModelError
from medtune.io import atomic_dir
from medtune.train.models import (
    _check_model_path,
    _hf_kwargs,
    bitsandbytes_available,
    cuda_available,
    is_adapter_dir,
    load_model,
    load_tokenizer,
    save_tokenizer,
)

log = logging.getLogger(__name__)


def _merge_dtype(config: Any) -> torch.dtype:
    """The base's own dtype (bf16 for most modern checkpoints), fp32 when it declares none."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _load_base(base: str, is_seq2seq: bool) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kwargs = _hf_kwargs(None)
    try:
        config = AutoConfig.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise ModelError(f"merge: cannot read the base model {base!r}: {exc}") from None
    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    quant = getattr(config, "quantization_config", None)
    quant_method = (
        quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    )
    if quant_method == "bitsandbytes":
        if not (cuda_available() and bitsandbytes_available()):
            raise HardwareError(
                f"merge: the base {base!r} is stored 4/8-bit (bitsandbytes); dequantising it needs CUDA and "
                "bitsandbytes. Pass base_model= the original 16-bit checkpoint instead."
            )
        model = auto.from_pretrained(base, device_map={"": 0}, **kwargs)
        log.info("merge: dequantising the bitsandbytes base %s before merging", base)
        return model.dequantize().to(torch.bfloat16)
    return auto.from_pretrained(base, dtype=_merge_dtype(config), **kwargs)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, *, base_model: str | None = None) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into its base and save a standalone model to `out_dir`."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise ModelError(f"merge: {adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    base = base_model or peft_config.base_model_name_or_path
    if not base:
        raise ModelError(f"merge: {adapter_dir}/adapter_config.json names no base model; pass base_model=")
    base = _check_model_path(base)
    is_seq2seq = str(peft_config.task_type) in ("SEQ_2_SEQ_LM", "TaskType.SEQ_2_SEQ_LM")
    # The base may itself be an unmerged adapter (e.g. DPO on an SFT adapter kept with merge: false).
    model = load_model(base) if is_adapter_dir(base) else _load_base(base, is_seq2seq)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    # The tokenizer saved with the adapter (it carries the chat template used in training), else the base's.
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base, chat=not is_seq2seq)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)  # safetensors
        save_tokenizer(tokenizer, tmp)
    log.info("merged %s into %s -> %s", adapter_dir, base, out_dir)
    return out_dir
