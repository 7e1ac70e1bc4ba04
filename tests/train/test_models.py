"""The embedded model and model loading: tokenizer round trip, chat tokens, sizes, fast failures."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.config import EmbeddedModelConfig, ModelConfig, StageConfig
from medtune.errors import ConfigError, DataError, HardwareError, ModelError
from medtune.train import models
from medtune.train.common import trainer_arguments
from medtune.train.models import build_embedded_model, load_for_training, load_tokenizer

TEXTS = [
    "Patiente de 34 ans, céphalées brutales, fièvre à 39,5 °C ; pas de déficit focal. « Où ? »",
    json.dumps(
        {
            "pathologie": "Fasciite plantaire",
            "confiance": "élevée",
            "justification": "pronation_pied = 7.2 > 6",
        },
        ensure_ascii=False,
    ),
    "  deux espaces,\ttab et\nnouvelle ligne — œdème, ß, 日本",
]


def test_tokenizer_round_trips_french_and_json(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        # No unknown token: byte fallback covers characters never seen in training.
        assert tokenizer.unk_token_id not in ids


def test_chat_tokens_are_single_tokens_and_eos_ends_the_turn(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(marker)) == 1
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [
        {"role": "system", "content": "Tu es ARIA."},
        {"role": "user", "content": "Diagnostic ?"},
        {"role": "assistant", "content": '{"pathologie": "Périostite tibiale"}'},
    ]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    # The assistant answer and its end-of-turn token carry loss, nothing of the prompt does.
    assert tokenizer.decode(trained).rstrip("\n") == '{"pathologie": "Périostite tibiale"}<|im_end|>'


def test_sentencepiece_file_matches_the_hf_tokenizer(tiny_model_dir):
    """llama.cpp's GGUF converter reads tokenizer.model: it must tokenise text as transformers does."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert sp.get_piece_size() == len(tokenizer)
    for text in TEXTS:
        assert sp.encode(text) == tokenizer.encode(text)


def test_numbers_become_whole_tokens_without_split_digits(tiny_model_factory):
    texts = [f"longueur_foulée: {v / 100:.2f} m (seuil 1.35 m)" for v in range(100, 200)] * 20
    split = AutoTokenizer.from_pretrained(tiny_model_factory("split", texts=texts, vocab_size=400))
    whole = AutoTokenizer.from_pretrained(
        tiny_model_factory("whole", texts=texts, vocab_size=400, split_digits=False)
    )
    assert split.tokenize("1.35") == ["1", ".", "3", "5"]
    assert len(whole.tokenize("1.35")) < 4
    for tokenizer in (split, whole):  # lossless either way
        assert tokenizer.decode(tokenizer.encode("seuil 1.35 m", add_special_tokens=False)) == "seuil 1.35 m"


def test_symbols_become_one_token_wherever_they_appear(tiny_model_factory):
    texts = [
        f"heel_strike_index: 0.{v} (seuil 0.7)\nle plus proche: heel_strike_index" for v in range(40, 99)
    ] * 10
    path = tiny_model_factory("terms", texts=texts, vocab_size=300, symbols=["heel_strike_index"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    for text in (
        "heel_strike_index: 0.64",
        '"justification": "heel_strike_index 0.84 > 0.7"',
        "x heel_strike_index",
    ):
        pieces = tokenizer.tokenize(text)
        assert sum("heel_strike_index" in p for p in pieces) == 1, pieces
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))  # what GGUF export reads
    assert sp.encode("a heel_strike_index b") == tokenizer.encode(
        "a heel_strike_index b", add_special_tokens=False
    )


def test_embedded_sizes_and_determinism(tiny_model_factory, tmp_path):
    small = models.embedded_dimensions(EmbeddedModelConfig(size="small"))
    assert small == {
        "hidden_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "num_key_value_heads": 4,
    }
    a = tiny_model_factory("a", seed=3)
    b = tiny_model_factory("b", seed=3)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_grouped_query_attention_shares_key_value_heads(tiny_model_factory):
    path = tiny_model_factory("gqa", size="small", num_kv_heads=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 1)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 192 and attention.k_proj.out_features == 48  # one head of 48


def test_small_model_is_about_two_million_parameters(tmp_path):
    from fixtures_models import tiny_corpus

    path = build_embedded_model(tiny_corpus(), EmbeddedModelConfig(size="small"), tmp_path / "small")
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    assert 1.5e6 < n < 2.5e6


def test_bad_embedded_configs_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="empty"):
        build_embedded_model([], EmbeddedModelConfig(size="tiny"), tmp_path / "m")
    with pytest.raises(ConfigError, match="vocab_size=64"):
        build_embedded_model(TEXTS, EmbeddedModelConfig(size="tiny", vocab_size=64), tmp_path / "m")
    with pytest.raises(ConfigError, match="multiple"):
        build_embedded_model(
            TEXTS, EmbeddedModelConfig(size="tiny", hidden_size=30, num_heads=4), tmp_path / "m"
        )
    with pytest.raises(ConfigError, match="num_kv_heads 3"):
        build_embedded_model(TEXTS, EmbeddedModelConfig(size="small", num_kv_heads=3), tmp_path / "m")
    with pytest.raises(ConfigError, match="already a chat-template marker"):
        build_embedded_model(
            TEXTS, EmbeddedModelConfig(size="tiny", symbols=["<|im_start|>"]), tmp_path / "m"
        )
    with pytest.raises(ValueError, match="surrounding spaces"):
        EmbeddedModelConfig(symbols=[" x"])
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_qlora_without_cuda_fails_before_loading(monkeypatch):
    monkeypatch.setattr(models, "cuda_available", lambda: False)
    stage = StageConfig(method="qlora")
    # The model path does not even exist: the hardware check must come first, before any work.
    with pytest.raises(HardwareError, match=r"qlora.*CUDA"):
        load_for_training("/nonexistent/model", stage, ModelConfig())
    with pytest.raises(HardwareError, match="paged_adamw_8bit"):
        load_for_training("/nonexistent/model", StageConfig(optimizer="paged_adamw_8bit"), ModelConfig())


def test_missing_model_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_lora_wraps_only_adapters_as_trainable(tiny_model_dir):
    model, tokenizer = load_for_training(tiny_model_dir, StageConfig(method="lora"), ModelConfig())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert tokenizer.chat_template


@pytest.mark.parametrize(("template", "end_of_turn"), [("llama3", "<|eot_id|>"), ("mistral", "</s>")])
def test_other_templates_get_their_markers_as_tokens(tmp_path, template, end_of_turn):
    path = build_embedded_model(TEXTS * 20, EmbeddedModelConfig(size="tiny", vocab_size=400), tmp_path / "m",
                                chat_template=template)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == end_of_turn
    messages = [{"role": "user", "content": "Diagnostic ?"}, {"role": "assistant", "content": "Fasciite"}]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.eos_token_id in trained  # the model learns to emit its end-of-turn token
    for marker in ("<|start_header_id|>", "<|end_header_id|>") if template == "llama3" else ():
        assert len(tokenizer.encode(marker)) == 1


def test_bf16_full_training_keeps_fp32_master_weights(tiny_model_dir):
    # Mixed precision: the trainer's bf16 autocast runs the matmuls, the trained weights stay fp32.
    model, _ = load_for_training(tiny_model_dir, StageConfig(method="full", precision="bf16"), ModelConfig())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    args = trainer_arguments(StageConfig(precision="bf16"), tiny_model_dir, seed=0, has_eval=False)
    assert args["bf16"] is True and args["fp16"] is False


def test_bf16_lora_loads_the_frozen_base_in_bf16(tiny_model_dir):
    model, _ = load_for_training(tiny_model_dir, StageConfig(method="lora", precision="bf16"), ModelConfig())
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
