"""Adapter-only export of a run's LoRA stage, and fusion of an adapter into its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medtune.errors import ModelError
from medtune.export.adapters import export_adapter, find_adapter, fuse_adapter


def test_the_runs_lora_adapter_exports_alone(tiny_run_dir: Path, tmp_path: Path):
    out = export_adapter(tiny_run_dir, tmp_path / "derm", stage="sft")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    assert not any("checkpoint" in n or n.startswith("optimizer") for n in names)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    # The adapter is a small fraction of the model it adapts.
    model_size = (tiny_run_dir / "sft" / "model.safetensors").stat().st_size
    assert (out / "adapter_model.safetensors").stat().st_size < model_size


def test_a_full_fine_tuned_stage_has_no_adapter_and_says_so(tiny_run_dir: Path):
    with pytest.raises(ModelError, match="method=full, so it has no adapter"):
        find_adapter(tiny_run_dir, stage="dpo")


def test_fused_adapter_gives_the_merged_stage_logits(tiny_run_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    fused = fuse_adapter(tiny_run_dir, tmp_path / "fused", stage="sft")
    ids = torch.tensor([[4, 10, 20, 30, 40]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(fused)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tiny_run_dir / "sft")(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
