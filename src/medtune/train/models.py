"""Base models for training: build the embedded model, load any Hugging Face model, wrap it for a method.

    path = build_embedded_model(texts, EmbeddedModelConfig(size="small"), Path("runs/aria/base"))
    tokenizer = load_tokenizer(path)
    model, tokenizer = load_for_training(path, recipe.train.sft, recipe.model)   # full, lora or qlora

The embedded model is a small Llama-architecture network with a SentencePiece tokenizer trained on the
run's own texts. Both are saved in plain Hugging Face format (safetensors, tokenizer.model, tokenizer.json,
chat template), so merge, GGUF export and serving treat it like any downloaded model. The SentencePiece
vocabulary (byte fallback, Llama-style) is what llama.cpp's GGUF converter reads from `tokenizer.model`.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from medtune.config import EmbeddedModelConfig, ModelConfig, StageConfig
from medtune.errors import ConfigError, DataError, HardwareError, ModelError
from medtune.io import atomic_dir

log = logging.getLogger(__name__)

# name -> (hidden, layers, heads, mlp). "small" is ~2M parameters, the CPU default (MISSION.md).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (32, 2, 2, 64),
    "small": (192, 4, 4, 512),
    "base": (384, 6, 6, 1024),
}
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


# --------------------------------------------------------------------------------------------------
# The embedded model


def template_special_tokens(chat_template: str) -> tuple[str, str, list[str]]:
    """(Jinja source, end-of-turn token, other marker tokens) of a template name or Jinja string.

    The end-of-turn token is the marker the template writes right after an assistant answer (chatml:
    <|im_end|>, llama3: <|eot_id|>, gemma: <end_of_turn>); templates that end turns with the eos
    token itself (mistral, alpaca, ...) get "</s>".
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    from medtune.data.templates import TEMPLATE_TOKENS, get_template

    if "{%" in chat_template:
        template = chat_template
        markers = sorted({t for tokens in TEMPLATE_TOKENS.values() for t in tokens if t in template})
    else:
        template = get_template(chat_template)
        markers = next((list(t) for name, t in TEMPLATE_TOKENS.items() if get_template(name) == template), [])
    sentinel = "\u2063answer\u2063"
    turns = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": sentinel},
        {"role": "user", "content": "?"},
    ]
    rendered, _ = render_jinja_template([turns], chat_template=template, bos_token=BOS, eos_token=EOS)
    after = rendered[0].split(sentinel, 1)[1].lstrip()
    eot = next((m for m in markers if after.startswith(m)), EOS)
    return template, eot, [m for m in markers if m != eot]


def _train_sentencepiece(
    texts: list[str],
    vocab_size: int,
    seed: int,
    eos: str,
    symbols: list[str],
    split_digits: bool = True,
    terms: list[str] | None = None,
) -> bytes:
    """A Llama-style SentencePiece BPE model trained on `texts`, returned as the serialized proto.

    `symbols` are the chat markers (cut out of the corpus), `terms` the recipe's domain terms (kept in
    it); both become one token each."""
    import sentencepiece as spm

    # One sentence per line; the chat markers are symbols of their own and must not eat merges.
    lines = []
    for text in texts:
        for marker in (eos, *symbols):
            text = text.replace(marker, "\n")
        lines.extend(line for line in text.split("\n") if line.strip())
    if not lines:
        raise DataError("embedded model: the tokenizer corpus is empty (no training text was given)")
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus may not fill the vocabulary; that is fine
            byte_fallback=True,  # any character encodes (as bytes) even if unseen: lossless
            character_coverage=1.0,
            split_digits=split_digits,  # model.embedded.split_digits
            # Lossless text: no Unicode normalisation, whitespace kept as is, no dummy prefix
            # (so HF, SentencePiece and llama.cpp tokenise a chat identically).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 15,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=eos,  # the template's end-of-turn token is the model's eos: generation stops on it
            pad_piece=PAD,
            user_defined_symbols=[*symbols, *(terms or [])],  # markers and terms: one token each
            input_sentence_size=200_000,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000,
            num_threads=max(1, min(4, os.cpu_count() or 1)),
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. vocab_size smaller than the byte pieces + specials
        raise ConfigError(
            f"model.embedded.vocab_size={vocab_size}: SentencePiece refused it: {exc}"
        ) from None
    return buf.getvalue()


def embedded_dimensions(cfg: EmbeddedModelConfig) -> dict[str, int]:
    """hidden/layers/heads/kv heads/mlp of the configured size, with the recipe's explicit overrides."""
    hidden, layers, heads, mlp = SIZES[cfg.size]
    dims = {
        "hidden_size": cfg.hidden_size or hidden,
        "num_hidden_layers": cfg.num_layers or layers,
        "num_attention_heads": cfg.num_heads or heads,
        "intermediate_size": cfg.intermediate_size or mlp,
    }
    dims["num_key_value_heads"] = cfg.num_kv_heads or dims["num_attention_heads"]
    if dims["hidden_size"] % dims["num_attention_heads"]:
        raise ConfigError(
            f"model.embedded: hidden_size {dims['hidden_size']} is not a multiple of "
            f"num_heads {dims['num_attention_heads']}"
        )
    if dims["num_attention_heads"] % dims["num_key_value_heads"]:
        raise ConfigError(
            f"model.embedded: num_heads {dims['num_attention_heads']} is not a multiple of "
            f"num_kv_heads {dims['num_key_value_heads']} (query heads share key/value heads in equal groups)"
        )
    return dims


def build_embedded_model(
    texts: Iterable[str],
    cfg: EmbeddedModelConfig,
    out_dir: Path,
    *,
    chat_template: str = "chatml",
    seed: int = 0,
) -> Path:
    """Train a tokenizer on `texts`, build a randomly initialised Llama model, save both to `out_dir`.

    `chat_template` is a template name from `medtune.data.templates` (or a Jinja string); its marker
    strings become single tokens and its end-of-turn token the eos. The folder is written atomically:
    it is complete or absent.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    template, eot, symbols = template_special_tokens(chat_template)
    dims = embedded_dimensions(cfg)
    clash = sorted(set(cfg.symbols) & {eot, *symbols})
    if clash:
        raise ConfigError(f"model.embedded.symbols: {clash[0]!r} is already a chat-template marker")
    proto = _train_sentencepiece(
        list(texts), cfg.vocab_size, seed, eot, symbols, cfg.split_digits, terms=cfg.symbols
    )
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "tokenizer.model").write_bytes(proto)
        # transformers converts the SentencePiece proto into a fast tokenizer (tokenizer.json) here.
        tokenizer = LlamaTokenizer.from_pretrained(
            tmp,
            add_bos_token=False,  # chatml has no bos; training and serving must agree
            add_eos_token=False,
            add_prefix_space=False,  # matches add_dummy_prefix=False in the proto
            legacy=False,
            bos_token=BOS,
            eos_token=eot,
            pad_token=PAD,
            unk_token=UNK,
            model_max_length=cfg.max_position_embeddings,
        )
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp)  # tokenizer.model is already there

        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,  # a small vocabulary: sharing the matrix saves ~15% of the weights
            **dims,
        )
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        model.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "embedded model %s: %.2fM parameters, vocab %d -> %s",
        cfg.size,
        n_params / 1e6,
        len(tokenizer),
        out_dir,
    )
    return out_dir


# --------------------------------------------------------------------------------------------------
# Loading


def _check_model_path(path: str | Path) -> str:
    """A local folder must exist; anything else is taken as a hub id (needs network or the HF cache)."""
    text = str(path)
    local = Path(text).expanduser()
    looks_local = text.startswith((".", "/", "~")) or local.exists() or text.count("/") > 1
    if looks_local and not local.exists():
        raise ModelError(f"model {text!r}: local folder not found")
    return str(local) if local.exists() else text


def _hf_kwargs(model_cfg: ModelConfig | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if model_cfg is not None:
        kwargs["trust_remote_code"] = model_cfg.trust_remote_code
        if model_cfg.revision:
            kwargs["revision"] = model_cfg.revision
    token = os.environ.get("HF_TOKEN")
    if token:
        kwargs["token"] = token
    return kwargs


def load_tokenizer(path: str | Path, model_cfg: ModelConfig | None = None, *, chat: bool = True) -> Any:
    """The tokenizer of a model folder or hub id, with a pad token and (when `chat`) a chat template."""
    from transformers import AutoTokenizer

    from medtune.data.templates import ensure_chat_template

    source = _check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hf_kwargs(model_cfg))
    except OSError as exc:
        raise ModelError(f"model {source!r}: cannot load its tokenizer: {exc}") from None
    if tokenizer.pad_token is None:
        # Padding positions never carry loss, so reusing eos (or unk) as pad is safe.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if chat:
        ensure_chat_template(tokenizer, model_cfg.chat_template if model_cfg else None)
    return tokenizer


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """save_pretrained, plus the SentencePiece `tokenizer.model` (transformers 5 writes only tokenizer.json,
    but llama.cpp's GGUF converter reads the SentencePiece file)."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = getattr(tokenizer, "vocab_file", None)
    target = out_dir / "tokenizer.model"
    if source and str(source).endswith(".model") and Path(source).is_file() and not target.exists():
        shutil.copyfile(source, target)


def model_kind(path: str | Path, model_cfg: ModelConfig | None = None) -> str:
    """'seq2seq' for encoder-decoder models (T5 family), else 'causal'."""
    if model_cfg is not None and model_cfg.kind != "auto":
        return model_cfg.kind
    from transformers import AutoConfig

    source = _check_model_path(path)
    if is_adapter_dir(source):
        from peft import PeftConfig

        source = PeftConfig.from_pretrained(source).base_model_name_or_path
    try:
        config = AutoConfig.from_pretrained(source, **_hf_kwargs(model_cfg))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {source!r}: cannot read its config: {exc}") from None
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def check_hardware(stage: StageConfig, key: str = "train") -> None:
    """Fail at once, before any loading, when the stage asks for something this machine cannot do."""
    needs_bnb = []
    if stage.method == "qlora":
        needs_bnb.append(f"{key}.method=qlora (4-bit NF4 base)")
    if stage.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        needs_bnb.append(f"{key}.optimizer={stage.optimizer}")
    if not needs_bnb:
        return
    missing = []
    if not cuda_available():
        missing.append("a CUDA GPU (none found)")
    if not bitsandbytes_available():
        missing.append("bitsandbytes (pip install 'medtune[gpu]')")
    if missing:
        alt = "use method=lora (or full)" if stage.method == "qlora" else "use optimizer=adamw"
        raise HardwareError(f"{' and '.join(needs_bnb)} needs {' and '.join(missing)}; on this machine {alt}")


def resolve_dtype(precision: str) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU."""
    if precision == "auto":
        if not cuda_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and not cuda_available():
        raise HardwareError("precision=fp16 needs a CUDA GPU; use fp32 (or bf16) on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _auto_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def load_model(
    path: str | Path,
    model_cfg: ModelConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    quantization_config: Any = None,
) -> Any:
    """A plain (non-PEFT) model. An adapter folder is loaded onto its base and merged in memory."""
    source = _check_model_path(path)
    kind = model_kind(source, model_cfg)
    kwargs = _hf_kwargs(model_cfg)
    try:
        if is_adapter_dir(source):
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM

            peft_cls = AutoPeftModelForSeq2SeqLM if kind == "seq2seq" else AutoPeftModelForCausalLM
            return peft_cls.from_pretrained(source, dtype=dtype, **kwargs).merge_and_unload()
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
            from accelerate import PartialState

            # One whole copy per process (under `accelerate launch` each process has its own GPU).
            kwargs["device_map"] = {"": PartialState().local_process_index}
        return _auto_class(kind).from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelError(f"model {source!r}: cannot load it: {exc}") from None


def lora_config(stage: StageConfig, kind: str = "causal") -> Any:
    from peft import LoraConfig, TaskType

    lora = stage.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM,
    )


def load_for_training(model_path: str | Path, stage: StageConfig, model_cfg: ModelConfig) -> tuple[Any, Any]:
    """(model, tokenizer) ready for a trainer: plain for `full`, PEFT-wrapped for `lora` and `qlora`."""
    check_hardware(stage)
    dtype = resolve_dtype(stage.precision)
    if stage.method == "full" and dtype != torch.float32:
        # Mixed precision: every weight is trained, so the master copy stays fp32 (bf16 weights would
        # lose small AdamW updates); the trainer's bf16/fp16 flag runs the matmuls in half precision
        # under autocast (on CPU too, where bf16 needs avx512_bf16 or AMX to be fast).
        dtype = torch.float32
    source = _check_model_path(model_path)
    kind = model_kind(source, model_cfg)
    # Encoder-decoder models read plain text (see seq2seq.py): no chat template needed.
    tokenizer = load_tokenizer(source, model_cfg, chat=kind != "seq2seq")
    quant = None
    if stage.method == "qlora":
        from transformers import BitsAndBytesConfig

        q = stage.qlora
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
    model = load_model(source, model_cfg, dtype=dtype, quantization_config=quant)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if stage.method == "full":
        return model, tokenizer

    from peft import get_peft_model, prepare_model_for_kbit_training

    if stage.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=stage.gradient_checkpointing
        )
    model = get_peft_model(model, lora_config(stage, kind))
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "%s: %d trainable parameters of %d (%.2f%%)", stage.method, trainable, total, 100 * trainable / total
    )
    return model, tokenizer
