"""GGUF export of the tiny embedded model: llama.cpp's converter + quantizer, metadata, fidelity, failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fixtures_models import tiny_chat_records
from medtune.errors import ModelError
from medtune.export.gguf import check_tokenization, export_ggufs, read_metadata, token_text

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.gguf
MAX_NEW = 16


def _hf_greedy(model_dir: Path, prompts: list[str]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outs = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id)
        outs.append(out[0, ids.shape[1] :].tolist())
    return outs


def _gguf_greedy(path: Path, prompts: list[str], eos: int) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    outs = []
    try:
        for text in prompts:
            ids: list[int] = []
            for token in llm.generate(
                llm.tokenize(text.encode(), add_bos=False, special=True), temp=0.0, top_k=1
            ):
                ids.append(token)
                if token == eos or len(ids) == MAX_NEW:
                    break
            outs.append(ids)
    finally:
        llm.close()
    return outs


def test_chat_template_and_stop_tokens_travel_into_the_metadata(ggufs, tiny_model_dir):
    from medtune.train.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    for path in ggufs.values():
        meta = read_metadata(path)
        assert meta["tokenizer.chat_template"] == tok.chat_template
        assert token_text(path, meta["tokenizer.ggml.eos_token_id"]) == "<|im_end|>"
        assert token_text(path, meta["tokenizer.ggml.eot_token_id"]) == "<|im_end|>"
        assert meta["tokenizer.ggml.add_bos_token"] is False  # chatml prompts have no BOS, as in training
    assert read_metadata(ggufs["q8_0"])["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_greedy_generation_equals_the_hf_model(ggufs, tiny_model_dir, quant):
    from medtune.data.templates import render_chat
    from medtune.train.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    prompts = [
        render_chat(r["messages"][:2], tok, add_generation_prompt=True) for r in tiny_chat_records(8, seed=3)
    ]
    hf = _hf_greedy(tiny_model_dir, prompts)
    assert all(hf), "the HF model generated nothing: the comparison would be empty"
    assert _gguf_greedy(ggufs[quant], prompts, tok.eos_token_id) == hf


def test_a_grouped_query_model_converts_with_the_same_greedy_output(tiny_gqa_model_dir, tmp_path):
    """Key/value heads shared by query heads (`model.embedded.num_kv_heads`) travel into the GGUF."""
    from medtune.data.templates import render_chat
    from medtune.train.models import load_tokenizer

    model_dir = tiny_gqa_model_dir
    (f16,) = export_ggufs(model_dir, tmp_path, ["f16"], name="gqa")
    meta = read_metadata(f16.path)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (2, 1)
    tok = load_tokenizer(model_dir)
    prompts = [
        render_chat(r["messages"][:2], tok, add_generation_prompt=True) for r in tiny_chat_records(4, seed=5)
    ]
    hf = _hf_greedy(model_dir, prompts)
    assert all(hf), "the HF model generated nothing: the comparison would be empty"
    assert _gguf_greedy(f16.path, prompts, tok.eos_token_id) == hf


def test_a_gguf_that_tokenizes_differently_is_refused(ggufs, tiny_model_factory):
    from medtune.train.models import load_tokenizer

    other = load_tokenizer(tiny_model_factory("other-vocab", texts=["zzz yyy xxx " * 3, "wwwww vvvv"]))
    with pytest.raises(ModelError, match="tokenizes the chat format differently"):
        check_tokenization(ggufs["f16"], other, [[{"role": "user", "content": "Patiente de 34 ans"}]])


def test_unsupported_architecture_fails_naming_it_and_writes_nothing(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="does not support the architecture FancyNewForCausalLM"):
        export_ggufs(model, out, ["q8_0"])
    assert not out.exists() or not any(out.iterdir())


def test_unknown_bpe_pretokenizer_fails_naming_the_cause(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from medtune.data.templates import get_template

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    # A byte-level BPE with a pre-tokenizer no published model uses: llama.cpp cannot reproduce it.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator([f"bonjour le monde {i}" for i in range(100)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>")
    tok.chat_template = get_template("chatml")
    tok.save_pretrained(model)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="BPE pre-tokenizer is unknown"):
        export_ggufs(model, out, ["f16"])
    assert not out.exists() or not any(out.iterdir())


def test_a_model_without_chat_template_still_exports(tiny_model_dir, tmp_path):
    """A base model (continued pretraining only) has no chat format: its GGUF has no template either."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (file,) = export_ggufs(model, tmp_path / "out", ["q8_0"])
    meta = read_metadata(file.path)
    assert "tokenizer.chat_template" not in meta
    assert token_text(file.path, meta["tokenizer.ggml.eos_token_id"]) == "<|im_end|>"
