"""GGUF export: a Hugging Face model folder -> one .gguf file per quantization, for llama.cpp and Ollama.

    medtune export gguf runs/aria --quant q4_k_m            # or a model folder, or an adapter folder
    paths = export_gguf("runs/aria/dpo", "out/aria-q8_0.gguf", quant="q8_0")

Conversion is llama.cpp's own `convert_hf_to_gguf.py` (`medtune.export.converter`), quantization is
llama.cpp's quantizer (`llama_cpp.llama_model_quantize`). medtune adds what those tools leave to the
user, the part that silently breaks chat models:

- Special tokens. transformers 5 no longer writes `added_tokens_decoder` into tokenizer_config.json,
  and the converter's SentencePiece path reads special tokens only from there: `<|im_start|>` would
  become a plain piece that llama.cpp splits into bytes. We stage the folder (symlinks) with a
  tokenizer_config.json completed from the loaded tokenizer, plus `add_prefix_space` as the tokenizer
  really behaves after a special token.
- Stop tokens: the end-of-turn token (`tokenizer.ggml.eot_token_id`) and `add_bos_token` are written
  with the quantizer's KV overrides; the chat template travels as `tokenizer.chat_template`.
- A check before the file is published: llama.cpp must tokenize rendered chats exactly as the
  Hugging Face tokenizer does, or the export fails naming the first differing token.

Every output is written to a temporary file and renamed at the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.errors import ModelError
from medtune.export import converter
from medtune.io import atomic_path

log = logging.getLogger(__name__)

# --quant name -> llama_ftype (llama.h). Float types come straight from the converter.
QUANTIZATIONS: dict[str, int] = {
    "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q5_k_s": 16, "q5_0": 8, "q5_1": 9,
    "q4_k_m": 15, "q4_k_s": 14, "q4_0": 2, "q4_1": 3, "q3_k_l": 13, "q3_k_m": 12, "q3_k_s": 11, "q2_k": 10,
    "iq4_nl": 25, "iq4_xs": 30,
}  # fmt: skip
FLOAT_TYPES = ("f32", "f16", "bf16")

# Texts rendered through the chat template to check llama.cpp tokenizes like Hugging Face.
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "Tu es un assistant médical. Réponds en JSON."},
        {
            "role": "user",
            "content": "Patiente de 34 ans, céphalées depuis 3 jours ; pas de fièvre.  Déficit ?",
        },
        {"role": "assistant", "content": '{"pathologie": "Fasciite plantaire", "confiance": "élevée"}'},
        {"role": "user", "content": "inclinaison_tronc = 7.5°, longueur_foulée = 1.42 m\n\tEt ensuite ?"},
    ],
    [{"role": "user", "content": "Hello world! 1234567890 ÀÉÎÕÜ ß 漢字 🙂 <tag> {x: [1, 2]}"}],
]


@dataclass
class GgufFile:
    path: Path
    quant: str
    size_bytes: int


def parse_quant(name: str) -> str:
    key = name.lower().replace("-", "_")
    if key not in QUANTIZATIONS:
        raise ModelError(f"--quant {name!r}: unknown quantization (known: {', '.join(QUANTIZATIONS)})")
    return key


# --------------------------------------------------------------------------------------------------
# Staging: the model folder as the converter should see it


def _load_tokenizer(model_dir: Path) -> Any:
    from medtune.train.models import load_tokenizer

    return load_tokenizer(model_dir, chat=False)  # a base model without a chat template exports too


def _space_after_special(tokenizer: Any) -> bool | None:
    """Does the tokenizer start a word with a space marker right after a special token? None: n/a."""
    special = tokenizer.eos_token or tokenizer.bos_token
    if not special:
        return None
    ids = tokenizer.encode(special + "ab", add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if len(pieces) < 2:
        return None
    return pieces[1].startswith("▁")


def stage_model(model_dir: Path, tokenizer: Any, dest: Path) -> Path:
    """Symlink the model's files into `dest` with a completed tokenizer_config.json (see module doc)."""
    dest.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "tokenizer_config.json":
            (dest / item.name).symlink_to(item.resolve())
    cfg_path = model_dir / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if not cfg.get("added_tokens_decoder"):
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t.content, "special": bool(t.special)}
            for i, t in sorted(tokenizer.added_tokens_decoder.items())
        }
    if (model_dir / "tokenizer.model").is_file():
        after = _space_after_special(tokenizer)
        if after is not None:
            cfg["add_prefix_space"] = after
    (dest / "tokenizer_config.json").write_text(
        json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return dest


# --------------------------------------------------------------------------------------------------
# Conversion and quantization


@contextlib.contextmanager
def native_output() -> Iterator[Callable[[], list[str]]]:
    """Capture what llama.cpp's C code prints on stderr (one line per tensor while quantizing);
    yields a function returning the captured lines, which are also logged at debug level."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines.extend(capture.read().decode("utf-8", errors="replace").splitlines())
            for line in lines:
                log.debug("llama.cpp: %s", line)


def _kv_overrides(tokenizer: Any) -> dict[str, int | bool]:
    """GGUF keys the converter leaves unset or wrong: the end-of-turn token and whether to add BOS."""
    from medtune.data.templates import end_of_turn_tokens

    kv: dict[str, int | bool] = {}
    stops = end_of_turn_tokens(tokenizer) if tokenizer.chat_template else []
    if stops:
        eot = tokenizer.convert_tokens_to_ids(stops[0])
        if isinstance(eot, int) and eot != tokenizer.unk_token_id:
            kv["tokenizer.ggml.eot_token_id"] = eot
    bos = tokenizer.bos_token_id
    if bos is not None:
        kv["tokenizer.ggml.add_bos_token"] = tokenizer.encode("a")[:1] == [bos]
    return kv


def quantize(src: Path, dst: Path, quant: str, kv: dict[str, int | bool] | None = None) -> None:
    """llama.cpp's quantizer from `src` to `dst` (a plain copy when the type is unchanged), setting `kv`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[quant]
    params.nthread = os.cpu_count() or 1
    overrides = (llama_cpp.llama_model_kv_override * (len(kv or {}) + 1))()  # zeroed last = terminator
    for o, (key, value) in zip(overrides, (kv or {}).items(), strict=False):
        o.key = key.encode()
        if isinstance(value, bool):
            o.tag, o.value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
        else:
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    with native_output() as output:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    for line in output():
        if "fallback quantization" in line:
            # e.g. k-quants need rows of 256 values: a small model's tensors fall back to q5_0/q8_0.
            log.warning("%s: %s", quant, line.split(": ", 1)[-1])
    if rc != 0:
        raise ModelError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc})")


def check_tokenization(
    gguf_path: Path, tokenizer: Any, conversations: Iterable[list[dict[str, str]]]
) -> None:
    """Raise ModelError unless llama.cpp tokenizes each rendered conversation like the HF tokenizer."""
    import llama_cpp

    from medtune.data.templates import render_chat

    with native_output():
        vocab = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        for messages in conversations:
            if tokenizer.chat_template:
                text = render_chat(messages, tokenizer, add_generation_prompt=True)
            else:  # no chat format to check: the texts alone
                text = "\n".join(m["content"] for m in messages)
            ours = tokenizer.encode(text, add_special_tokens=False)
            theirs = vocab.tokenize(text.encode(), add_bos=False, special=True)
            if ours != theirs:
                i = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
                i = min(len(ours), len(theirs)) if i is None else i
                raise ModelError(
                    f"{gguf_path.name}: llama.cpp tokenizes the chat format differently from the Hugging Face "
                    f"tokenizer (first difference at token {i}: HF {tokenizer.convert_ids_to_tokens(ours[i : i + 3])} "
                    f"vs GGUF {[vocab.detokenize([t]).decode(errors='replace') for t in theirs[i : i + 3]]}); "
                    "the file was not written"
                )
    finally:
        vocab.close()


def export_ggufs(
    model: str | Path, out_dir: str | Path, quants: Iterable[str], *, name: str | None = None
) -> list[GgufFile]:
    """Convert once and write `<name>-<quant>.gguf` in `out_dir` for each quantization."""
    quants = [parse_quant(q) for q in quants]
    out_dir = Path(out_dir)
    with _model_folder(model) as model_dir:
        stem = name or _default_name(model_dir)
        return _export(model_dir, {q: out_dir / f"{stem}-{q}.gguf" for q in quants})


def export_gguf(model: str | Path, out: str | Path | None = None, quant: str = "q4_k_m") -> GgufFile:
    """Convert and quantize one model to one GGUF file (default: `<model>-<quant>.gguf` beside it)."""
    quant = parse_quant(quant)
    with _model_folder(model) as model_dir:
        target = Path(out) if out else model_dir.parent / f"{_default_name(model_dir)}-{quant}.gguf"
        return _export(model_dir, {quant: target})[0]


def _default_name(model_dir: Path) -> str:
    parts = model_dir.resolve().parts
    return "-".join(parts[-2:]) if len(parts) >= 2 else parts[-1]


def _model_folder(model: str | Path) -> Any:
    from medtune.export.runs import model_folder

    return model_folder(model)


def _export(model_dir: Path, targets: dict[str, Path]) -> list[GgufFile]:
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    tokenizer = _load_tokenizer(model_dir)
    kv = _kv_overrides(tokenizer)
    converter.converter_dir()  # fetch the converter (once) before any work
    results = []
    with tempfile.TemporaryDirectory(prefix="medtune-gguf-") as tmp:
        staged = stage_model(model_dir, tokenizer, Path(tmp) / "model")
        floats = sorted({q for q in targets if q in FLOAT_TYPES})
        sources = {}
        for outtype in floats or ["auto"]:  # `auto`: bf16 for a bf16 model, f16 otherwise
            sources[outtype] = Path(tmp) / f"converted-{outtype}.gguf"
            log.info("converting %s to GGUF (%s) with llama.cpp's converter", model_dir, outtype)
            converter.run_script(
                converter.SCRIPT,
                [str(staged), "--outtype", outtype, "--outfile", str(sources[outtype])],
                what=f"converting {model_dir} to GGUF",
            )
        for quant, target in targets.items():
            src = sources.get(quant) or next(iter(sources.values()))
            with atomic_path(target) as tmp_out:
                quantize(src, tmp_out, quant, kv)
                check_tokenization(tmp_out, tokenizer, PROBE_CONVERSATIONS)
            results.append(GgufFile(target, quant, target.stat().st_size))
            log.info("wrote %s (%s, %s)", target, quant, human_size(target.stat().st_size))
    return results


# --------------------------------------------------------------------------------------------------
# Reading


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (token lists left out)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                              "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):  # fmt: skip
            continue
        meta[key] = field.contents()
    return meta


def token_text(path: str | Path, token_id: int) -> str:
    """The text of one token in a GGUF vocabulary."""
    from gguf import GGUFReader

    return GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents(token_id)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
