"""Continued pretraining: raw text packed into fixed-length blocks, loss on every token, loss goes down."""

from __future__ import annotations

import json

import pytest

from fixtures_models import tiny_corpus
from medtune.config import ModelConfig, StageConfig
from medtune.errors import DataError
from medtune.train.pt import train_pt


def test_pt_trains_on_fixed_length_blocks(tiny_model_dir, tmp_path):
    texts = [{"text": t} for t in tiny_corpus(120)]
    stage = StageConfig(
        max_steps=10, max_length=64, learning_rate=5e-3, batch_size=8, logging_steps=2, save_steps=1000
    )
    result = train_pt(tiny_model_dir, texts, None, stage, ModelConfig(), tmp_path, seed=0)
    history = json.loads((tmp_path / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5
    # Every optimiser step saw batch_size full blocks of max_length tokens: nothing padded, nothing masked.
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    assert tokens[0] == 2 * 8 * 64  # logged after 2 steps
    assert not result.is_adapter and (result.output_dir / "model.safetensors").is_file()


def test_pt_rejects_records_without_text(tiny_model_dir, tmp_path):
    with pytest.raises(DataError, match="record 0 lacks text"):
        train_pt(tiny_model_dir, [{"messages": []}], None, StageConfig(), ModelConfig(), tmp_path, seed=0)
    with pytest.raises(DataError, match="every text is empty"):
        train_pt(tiny_model_dir, [{"text": "  "}], None, StageConfig(), ModelConfig(), tmp_path, seed=0)
