"""Seq2seq (T5 family) LoRA, as the seed's Flan-T5 adapters (r=8, alpha=32 on q and v): trains and merges."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from fixtures_models import tiny_chat_records
from medtune.config import LoraConfig, ModelConfig, StageConfig
from medtune.train.merge import merge_adapter
from medtune.train.seq2seq import seq2seq_prompt
from medtune.train.sft import train_sft


@pytest.fixture(scope="module")
def tiny_t5_dir(tiny_model_dir, tmp_path_factory):
    """A tiny T5 built in-process, sharing the embedded SentencePiece tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("t5") / "tiny-t5"
    T5ForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_seq2seq_lora_trains_and_merges(tiny_t5_dir, tmp_path):
    stage = StageConfig(
        method="lora", lora=LoraConfig(r=8, alpha=32, dropout=0.05, target_modules=["q", "v"]),
        max_steps=12, learning_rate=3e-2, batch_size=8, logging_steps=2, save_steps=1000,
    )  # fmt: skip
    records = tiny_chat_records(32)
    result = train_sft(tiny_t5_dir, records, None, stage, ModelConfig(), tmp_path / "sft", seed=0)
    assert result.is_adapter
    adapter = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q", "v"] and adapter["task_type"] == "SEQ_2_SEQ_LM"
    history = json.loads((tmp_path / "sft" / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]

    merged_dir = merge_adapter(result.output_dir, tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    source = tokenizer(seq2seq_prompt(records[0]["messages"][:-1]), return_tensors="pt")
    target = tokenizer(records[0]["messages"][-1]["content"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
        with_adapter = PeftModel.from_pretrained(base, str(result.output_dir)).eval()
        expected = with_adapter(**source, labels=target).logits
        merged = AutoModelForSeq2SeqLM.from_pretrained(merged_dir).eval()
        torch.testing.assert_close(merged(**source, labels=target).logits, expected, atol=1e-4, rtol=1e-4)


def test_seq2seq_prompt_joins_the_turns_before_the_answer():
    messages = tiny_chat_records(1)[0]["messages"]
    prompt = seq2seq_prompt(messages[:-1])
    assert prompt == messages[0]["content"] + "\n\n" + messages[1]["content"]
