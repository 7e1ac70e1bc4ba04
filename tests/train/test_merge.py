"""LoRA merge: the merged standalone model computes what base + adapter computes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures_models import tiny_chat_records
from medtune.config import ModelConfig, StageConfig
from medtune.errors import HardwareError, ModelError
from medtune.train import merge as merge_module
from medtune.train.merge import merge_adapter
from medtune.train.sft import train_sft


@pytest.fixture(scope="module")
def adapter_dir(tiny_sft_model_dir, tmp_path_factory):
    stage = StageConfig(method="lora", max_steps=4, learning_rate=2e-2, batch_size=8, save_steps=1000)
    out = tmp_path_factory.mktemp("lora")
    return train_sft(
        tiny_sft_model_dir, tiny_chat_records(16, seed=3), None, stage, ModelConfig(), out, seed=0
    ).output_dir


def test_merged_logits_equal_adapter_logits(adapter_dir, tiny_sft_model_dir, tmp_path):
    merged_dir = merge_adapter(adapter_dir, tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    text = tokenizer.apply_chat_template(tiny_chat_records(2, seed=9)[1]["messages"], tokenize=False)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_sft_model_dir).eval()
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert not torch.allclose(with_adapter, base_logits, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)


def test_merged_folder_is_standalone(adapter_dir, tmp_path):
    merged_dir = merge_adapter(adapter_dir, tmp_path / "merged")
    names = {p.name for p in merged_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer.model",
        "chat_template.jinja",
    } <= names
    assert "adapter_config.json" not in names
    assert not list(tmp_path.glob(".merged*"))  # no temporary folder left behind
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.eos_token == "<|im_end|>"


def test_merge_takes_an_explicit_base(adapter_dir, tiny_sft_model_dir, tmp_path):
    moved = tmp_path / "adapter"
    shutil.copytree(adapter_dir, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not found"):
        merge_adapter(moved, tmp_path / "m1")
    assert merge_adapter(moved, tmp_path / "m2", base_model=str(tiny_sft_model_dir)).is_dir()


def test_quantized_base_without_gpu_is_a_clear_error(adapter_dir, tiny_sft_model_dir, tmp_path, monkeypatch):
    base = tmp_path / "base-bnb-4bit"
    shutil.copytree(tiny_sft_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(merge_module, "cuda_available", lambda: False)
    with pytest.raises(HardwareError, match="base_model="):
        merge_adapter(adapter_dir, tmp_path / "m", base_model=str(base))
    assert not (tmp_path / "m").exists()


def test_not_an_adapter(tmp_path):
    with pytest.raises(ModelError, match="not a LoRA adapter"):
        merge_adapter(tmp_path, tmp_path / "out")


def test_adapter_on_an_unmerged_adapter(adapter_dir, tiny_sft_model_dir, tmp_path):
    """A second LoRA trained on top of an unmerged one (merge: false): both are fused into one model."""
    stage = StageConfig(method="lora", max_steps=2, learning_rate=2e-2, batch_size=8, save_steps=1000)
    records = tiny_chat_records(8, seed=4)
    second = train_sft(adapter_dir, records, None, stage, ModelConfig(), tmp_path / "s", seed=0).output_dir
    merged_dir = merge_adapter(second, tmp_path / "merged", base_model=str(adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = torch.tensor([tokenizer("Mesures du coureur")["input_ids"]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_sft_model_dir)
        first = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        expected = PeftModel.from_pretrained(first, str(second)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
