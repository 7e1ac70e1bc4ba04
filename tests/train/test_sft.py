"""SFT: the loss goes down, only assistant tokens (and the end-of-turn token) carry loss, outputs are usable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fixtures_models import tiny_chat_records
from medtune.config import ModelConfig, StageConfig
from medtune.errors import DataError, HardwareError
from medtune.train import models
from medtune.train.sft import build_sft_trainer, train_sft

FAST = {"learning_rate": 5e-3, "batch_size": 8, "logging_steps": 2, "save_steps": 1000, "eval_steps": 1000}


def _trained_text(trainer, row: int = 0) -> tuple[str, str]:
    """(text of the tokens that carry loss, full text) of one prepared training example."""
    tokenizer = trainer.processing_class
    example = trainer.train_dataset[row]
    ids, labels = example["input_ids"], example["labels"]
    trained = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    return tokenizer.decode(trained), tokenizer.decode(ids)


def test_sft_loss_decreases_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    stage = StageConfig(max_steps=16, **FAST)
    result = train_sft(tiny_model_dir, tiny_chat_records(32), None, stage, ModelConfig(), tmp_path, seed=0)
    history = json.loads((tmp_path / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] - 1.0  # from ~ln(vocab) down by more than a nat
    assert result.metrics["global_step"] == 16
    assert not result.is_adapter and result.output_dir == tmp_path / "model"
    assert result.loss_curve is not None and result.loss_curve.read_bytes()[:4] == b"\x89PNG"
    assert any((tmp_path / "tensorboard").iterdir())
    assert not (tmp_path / "checkpoints").exists()  # cleaned after success
    # The result is a standalone model folder with its tokenizer, chat template and SentencePiece file.
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    assert tokenizer.chat_template and (result.output_dir / "tokenizer.model").is_file()
    assert model.config.vocab_size == len(tokenizer)


def test_only_assistant_tokens_carry_loss(tiny_model_dir, tmp_path):
    records = tiny_chat_records(4)
    trainer = build_sft_trainer(tiny_model_dir, records, None, StageConfig(), ModelConfig(), tmp_path, seed=0)
    for row, record in enumerate(records):
        trained, full = _trained_text(trainer, row)
        answer = record["messages"][-1]["content"]
        assert trained.rstrip("\n") == answer + "<|im_end|>"
        assert record["messages"][1]["content"] in full  # the prompt is there, as context only


def test_examples_cut_by_max_length_are_reported(tiny_model_dir, tmp_path, caplog):
    records = tiny_chat_records(6)
    with caplog.at_level("WARNING", logger="medtune.train.common"):
        build_sft_trainer(tiny_model_dir, records, None, StageConfig(), ModelConfig(), tmp_path, seed=0)
    assert "max_length" not in caplog.text
    stage = StageConfig(max_length=16)  # shorter than the system prompt alone: all six are cut
    with caplog.at_level("WARNING", logger="medtune.train.common"):
        build_sft_trainer(tiny_model_dir, records, None, stage, ModelConfig(), tmp_path, seed=0)
    assert "6 of 6 examples are longer than train.sft.max_length=16" in caplog.text
    assert "6 of them had nothing left to learn from and were dropped" in caplog.text


def test_template_without_generation_markers_masks_the_prompt(tiny_model_dir, tmp_path):
    """A base whose template TRL cannot mark falls back to prompt/completion with the same mask."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    template = (model_dir / "chat_template.jinja").read_text()
    plain = template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert plain != template
    (model_dir / "chat_template.jinja").write_text(plain)
    records = tiny_chat_records(3)
    trainer = build_sft_trainer(
        model_dir, records, None, StageConfig(), ModelConfig(), tmp_path / "out", seed=0
    )
    for row, record in enumerate(records):
        trained, _ = _trained_text(trainer, row)
        assert trained.rstrip("\n") == record["messages"][-1]["content"] + "<|im_end|>"


def test_packing_keeps_examples_apart(tiny_model_dir, tmp_path):
    stage = StageConfig(packing=True, max_length=256, batch_size=2)
    records = tiny_chat_records(8)
    trainer = build_sft_trainer(tiny_model_dir, records, None, stage, ModelConfig(), tmp_path, seed=0)
    batch = next(iter(trainer.get_train_dataloader()))
    positions = batch["position_ids"][0]
    # Position ids restart at every packed example: transformers builds a block-diagonal mask from them.
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2
    tokenizer = trainer.processing_class
    trained = tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert trained.count("<|im_end|>") == len(starts)  # one answer (and its end) per example
    assert "Mesures du coureur" not in trained


def test_lora_sft_writes_an_adapter(tiny_model_dir, tmp_path):
    stage = StageConfig(method="lora", max_steps=4, **FAST)
    result = train_sft(tiny_model_dir, tiny_chat_records(16), None, stage, ModelConfig(), tmp_path, seed=0)
    assert result.is_adapter and (result.output_dir / "adapter_config.json").is_file()
    assert (result.output_dir / "tokenizer_config.json").is_file()


def test_validation_set_and_early_stopping(tiny_model_dir, tmp_path):
    stage = StageConfig(max_steps=12, early_stopping_patience=1, **{**FAST, "eval_steps": 4, "save_steps": 4})
    records = tiny_chat_records(24)
    result = train_sft(
        tiny_model_dir, records, tiny_chat_records(8, seed=5), stage, ModelConfig(), tmp_path, seed=0
    )
    assert "eval_loss" in result.metrics and torch.isfinite(torch.tensor(result.metrics["eval_loss"]))
    history = json.loads((tmp_path / "log_history.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert sorted(evals)[:3] == [4, 8, 12]
    # With early stopping the kept model is the best one on validation (its checkpoint was reloaded).
    assert result.metrics["eval_loss"] == pytest.approx(min(evals.values()), rel=1e-4)


def test_bad_records_and_hardware_fail_before_training(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="record 1 lacks messages"):
        train_sft(tiny_model_dir, [tiny_chat_records(1)[0], {"text": "x"}], None, StageConfig(), ModelConfig(),
                  tmp_path, seed=0)  # fmt: skip
    no_answer = [{"messages": [{"role": "user", "content": "Bonjour"}]}]
    with pytest.raises(DataError, match="no assistant turn"):
        train_sft(tiny_model_dir, no_answer, None, StageConfig(), ModelConfig(), tmp_path, seed=0)
    monkeypatch.setattr(models, "cuda_available", lambda: False)
    with pytest.raises(HardwareError, match=r"train\.sft\.method=qlora"):
        train_sft(tiny_model_dir, tiny_chat_records(2), None, StageConfig(method="qlora"), ModelConfig(),
                  tmp_path, seed=0)  # fmt: skip
    assert not (tmp_path / "model").exists()
