"""DPO: training on preference pairs raises the chosen-minus-rejected log-probability margin."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures_models import tiny_preference_records
from medtune.config import ModelConfig, StageConfig
from medtune.errors import ConfigError, DataError
from medtune.train.dpo import train_dpo
from medtune.train.merge import merge_adapter

FAST = {"batch_size": 4, "logging_steps": 2, "save_steps": 1000, "eval_steps": 1000, "beta": 0.1}


@torch.no_grad()
def mean_logps(model_dir, records) -> tuple[float, float]:
    """Mean over pairs of log p(chosen | prompt) and of log p(rejected | prompt), summed over answer tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sums = [0.0, 0.0]
    for record in records:
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt)["input_ids"])
        for i, key in enumerate(("chosen", "rejected")):
            text = tokenizer.apply_chat_template(record["prompt"] + record[key], tokenize=False)
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            sums[i] += float(logp[n_prompt - 1 :].sum())
    return sums[0] / len(records), sums[1] / len(records)


def mean_margin(model_dir, records) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt)."""
    chosen, rejected = mean_logps(model_dir, records)
    return chosen - rejected


def test_full_dpo_raises_the_margin(tiny_model_dir, tmp_path):
    pairs = tiny_preference_records(16)
    before = mean_margin(tiny_model_dir, pairs)
    stage = StageConfig(max_steps=8, learning_rate=3e-3, **FAST)
    result = train_dpo(tiny_model_dir, pairs, None, stage, ModelConfig(), tmp_path, seed=0)
    assert not result.is_adapter
    after = mean_margin(result.output_dir, pairs)
    assert after > before + 1.0
    assert result.metrics["global_step"] == 8


def test_rpo_dpo_plus_sft_raises_the_margin_and_keeps_the_chosen_answers(tiny_model_dir, tmp_path):
    # loss_type [sigmoid, sft]: the preference loss plus the chosen answers' NLL, in bf16 mixed precision.
    pairs = tiny_preference_records(16)
    chosen, rejected = mean_logps(tiny_model_dir, pairs)
    stage = StageConfig(max_steps=8, learning_rate=3e-3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                        precision="bf16", **FAST)  # fmt: skip
    result = train_dpo(tiny_model_dir, pairs, None, stage, ModelConfig(), tmp_path, seed=0)
    chosen_after, rejected_after = mean_logps(result.output_dir, pairs)
    assert chosen_after - rejected_after > chosen - rejected + 0.25
    assert chosen_after > chosen + 1.0  # the NLL term: the chosen answers become more likely, not less
    assert result.metrics["global_step"] == 8


def test_lora_dpo_with_implicit_reference_raises_the_margin(tiny_sft_model_dir, tmp_path):
    # From an SFT model, as in the pipeline: LoRA cannot move a random init's near-uniform output layer.
    pairs = tiny_preference_records(16)
    before = mean_margin(tiny_sft_model_dir, pairs)
    stage = StageConfig(method="lora", max_steps=8, learning_rate=2e-2, **FAST)
    stage.lora.r = 8
    result = train_dpo(tiny_sft_model_dir, pairs, None, stage, ModelConfig(), tmp_path / "dpo", seed=0)
    assert result.is_adapter
    merged = merge_adapter(result.output_dir, tmp_path / "merged")
    assert mean_margin(merged, pairs) > before + 0.5


def test_dpo_rejects_bad_input_before_loading(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="loss_type"):
        train_dpo(tiny_model_dir, tiny_preference_records(2), None, StageConfig(loss_type="sigmod"), ModelConfig(),
                  tmp_path, seed=0)  # fmt: skip
    with pytest.raises(ConfigError, match="unknown 'sfft'"):
        train_dpo(tiny_model_dir, tiny_preference_records(2), None, StageConfig(loss_type=["sigmoid", "sfft"]),
                  ModelConfig(), tmp_path, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="1 weight"):
        StageConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(DataError, match="record 0 lacks rejected"):
        bad = [{"prompt": "q", "chosen": "a"}]
        train_dpo(tiny_model_dir, bad, None, StageConfig(), ModelConfig(), tmp_path, seed=0)
