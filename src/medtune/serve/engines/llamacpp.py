"""The CPU serving engine for GGUF files: llama.cpp with continuous batching, same API as transformers.

    medtune serve --engine llamacpp --model runs/aria/gguf/aria-dpo-q8_0.gguf
    engine = LlamaCppEngine("model-q8_0.gguf", options=EngineOptions(max_batch_size=8)); engine.start()

llama-cpp-python's `Llama` class (and its OpenAI server, `python -m llama_cpp.server`) decodes one
sequence at a time and serialises concurrent requests behind a lock. llama.cpp itself batches many
sequences in one `llama_decode` call (each token of a `llama_batch` carries its sequence id; every
sequence has its own KV-cache slot), and llama-cpp-python exposes that low-level API. So this engine
has its own scheduler thread, like the transformers engine: each step it decodes one token for every
running request plus the prompt tokens of newly admitted ones (in chunks of at most `n_batch`), in a
single `llama_decode`, then samples every row with the shared `choose_tokens` (same sampling, seeds,
penalties, stop strings, streaming and logprobs as the transformers engine).

Constrained decoding is xgrammar over llama.cpp's logits (the shared `medtune.serve.guided.Guide`), not
llama.cpp's GBNF sampler: the same compiled grammar and the same compact JSON as the transformers
engine, applied to a whole batch in one call (BENCHMARKS.md, export section, has the measurement).
Jump-forward decoding as in the transformers engine: the tokens a row's grammar forces are fed in its
next `llama_decode` with the token it chose (a batch takes several tokens per sequence).
The Hugging Face tokenizer that xgrammar and incremental detokenisation need is rebuilt from the GGUF
by transformers; prompts are tokenised by llama.cpp itself (the model's own tokenizer). LoRA adapters
are not served per request here (llama.cpp applies an adapter to the whole context): fuse them first
(`medtune export adapter --fuse`) or use the transformers engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtune.errors import ConfigError, ModelError
from medtune.serve.engines.base import EngineOptions, GenerationRequest
from medtune.serve.engines.queued import QueuedEngine
from medtune.serve.engines.sequence import (
    Sequence,
    choose_tokens,
    common_prefix,
    merge_deltas,
    only_stop_allowed,
)
from medtune.serve.errors import BadRequest, ServeError, ShuttingDown
from medtune.serve.guided import Guide

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """A running request: its Sequence, its llama.cpp sequence id, tokens still to feed, KV position."""

    seq: Sequence
    seq_id: int
    pending: list[int]
    n_past: int = 0
    fed: list[int] = field(default_factory=list)  # tokens whose keys/values are in the sequence's cache
    meta: dict[str, Any] = field(default_factory=dict)


def gguf_file(model: str | Path) -> Path:
    """The .gguf file named by `model` (a file, or a folder holding exactly one)."""
    path = Path(model).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ModelError(f"--model: {path} holds {len(found)} .gguf files; name one of them")
        path = found[0]
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelError(f"--model: {path} is not a .gguf file (export one: medtune export gguf RUN)")
    return path


class LlamaCppEngine(QueuedEngine):
    name = "llamacpp"

    def __init__(
        self, model: str, adapters: dict[str, str] | None = None, options: EngineOptions | None = None
    ) -> None:
        if adapters:
            raise ConfigError(
                "--adapter: the llamacpp engine serves one fused model; merge the adapters first "
                "(medtune export adapter DIR --fuse) or serve with --engine transformers"
            )
        super().__init__(options)
        self.model_path = str(model)
        self.loaded = False
        self._thread: threading.Thread | None = None
        self._slots: list[_Slot] = []
        self.decode_steps = 0  # llama_decode calls so far (each serves every running request)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self.loaded:
            return
        try:
            import llama_cpp
            from llama_cpp import _internals
        except ImportError:
            raise ModelError(
                "the llamacpp engine needs llama-cpp-python: pip install 'medtune[gguf]'"
            ) from None
        from medtune.export.gguf import native_output

        path = gguf_file(self.model_path)
        opts = self.options
        if opts.device not in ("auto", "cpu"):
            raise ConfigError(f"--device {opts.device}: the llamacpp engine runs on the CPU here")
        self._llama = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        try:
            with native_output():
                self._model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as exc:
            raise ModelError(f"--model: llama.cpp cannot load {path}: {exc}") from None
        vocab = self._model.vocab
        self.vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.tokenizer = self._hf_tokenizer(path)
        train_ctx = self._model.n_ctx_train()
        self._max_context = min(opts.max_model_len or train_ctx, train_ctx)
        self.n_seq = opts.max_batch_size
        # As the transformers engine: a small model's ops are too short to pay for a team of threads,
        # and llama.cpp's threads spin while they wait, starving the HTTP side on a small machine.
        small = self._model.n_params() < 50_000_000
        threads = opts.threads or (1 if small else max(1, os.cpu_count() or 1))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = False  # one KV slot of max_context cells per sequence
        cparams.n_ctx = self._max_context * self.n_seq
        cparams.n_batch = cparams.n_ubatch = 512  # longer prompts are fed in chunks, between decode steps
        # As llama-cpp-python's own default: on this CPU, flash attention made one decode step of the
        # embedded model slower (small heads), and it changes nothing for correctness.
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        with native_output():
            self._ctx = _internals.LlamaContext(model=self._model, params=cparams, verbose=False)
        self.n_batch = cparams.n_batch
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self.add_bos = self._model.add_bos_token()
        self.bos_id = self._model.token_bos()
        self.eos_ids = {self._model.token_eos()}
        # Everything llama.cpp ends generation on (eos, eot, <|im_end|>, <end_of_turn>, ...).
        self.eog_ids = {t for t in range(self.vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self.turn_end_texts = self._turn_end_texts()
        self.guide = Guide(self.tokenizer, vocab_size=self.vocab, stop_token_ids=sorted(self.eog_ids))
        self._bitmask = self.guide.allocate(self.n_seq)
        self._free_ids = list(range(self.n_seq))
        self._cached: dict[int, list[int]] = {}  # free sequence id -> tokens still in its KV cache
        self.loaded = True
        self._thread = threading.Thread(target=self._run, name="medtune-llamacpp", daemon=True)
        self._thread.start()
        log.info("llamacpp engine: %s, context %d, %d parallel sequences, %d threads",
                 path, self._max_context, self.n_seq, threads)  # fmt: skip

    def _hf_tokenizer(self, path: Path) -> Any:
        """The GGUF's vocabulary as a Hugging Face tokenizer (for xgrammar, streaming detokenisation and
        the chat template), checked against llama.cpp's own tokenizer before serving."""
        from tokenizers import decoders, pre_tokenizers
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"--model: cannot read the tokenizer of {path}: {exc}") from None
        backend = tokenizer.backend_tokenizer
        meta = self._model.metadata()
        if meta.get("tokenizer.ggml.add_space_prefix") == "false" and isinstance(
            backend.pre_tokenizer, pre_tokenizers.Metaspace
        ):
            # transformers' GGUF reader ignores add_space_prefix=false (SentencePiece vocabularies without
            # a dummy prefix, like the embedded model's): it would prepend "▁" when encoding and strip a
            # leading space when decoding. Follow the file instead.
            backend.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="never", split=False
            )
            backend.decoder = decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            )
        self._check_tokenizer(tokenizer, path)
        return tokenizer

    def _check_tokenizer(self, tokenizer: Any, path: Path) -> None:
        from medtune.data.templates import render_chat
        from medtune.export.gguf import PROBE_CONVERSATIONS

        for messages in PROBE_CONVERSATIONS:
            text = (
                render_chat(messages, tokenizer, add_generation_prompt=True)
                if tokenizer.chat_template
                else ""
            )
            text += messages[-1]["content"]  # also plain text, outside any template
            ours = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if tokenizer.encode(text, add_special_tokens=False) != ours or tokenizer.decode(
                ours, skip_special_tokens=False
            ) != self._model.detokenize(ours, special=True).decode("utf-8", errors="replace"):
                raise ModelError(
                    f"--model: {path}: the Hugging Face tokenizer rebuilt from the GGUF does not encode or decode "
                    "like llama.cpp, so constrained decoding and streaming could not be trusted; export the "
                    "GGUF with `medtune export gguf`, or serve the model folder with --engine transformers"
                )

    def _turn_end_texts(self) -> list[str]:
        """End-of-turn markers of the chat template that are not one token (stop strings for chats)."""
        from medtune.data.templates import end_of_turn_tokens
        from medtune.errors import MedtuneError

        try:
            ends = end_of_turn_tokens(self.tokenizer)
        except MedtuneError:  # no chat template: only plain completions make sense
            return []
        return [t for t in ends if len(self.encode(t, add_bos=False)) != 1]

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for seq in list(self._waiting) + [s.seq for s in self._slots]:
            seq.deliver(ShuttingDown("the server stopped before this request finished"))
        self._waiting.clear()
        self._slots = []
        if self.loaded:
            from medtune.export.gguf import native_output

            with native_output():  # llama.cpp reports its buffers on stderr when freeing them
                self._llama.llama_batch_free(self._batch)
                self._ctx.close()
                self._model.close()
            self.loaded = False

    def health(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "engine": self.name, "model": self.model_path,
                "parallel": getattr(self, "n_seq", None), "context": getattr(self, "_max_context", None)}  # fmt: skip

    # -- text ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool) -> list[int]:
        """llama.cpp's own tokenisation (special tokens in the text are parsed as such)."""
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text, add_bos=False))

    @property
    def max_context(self) -> int:
        return self._max_context

    # -- requests ------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._slots)

    def _prepare(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> Sequence:
        if not self.loaded or self._stopping:
            raise ShuttingDown("the model is not loaded or the server is stopping")
        if req.adapter is not None:
            raise BadRequest("the llamacpp engine serves no adapters", param="model")
        chat = req.prompt is None
        # Chat prompts carry what the template puts at the start; a plain prompt gets BOS like HF's.
        prompt_ids = self.encode(self.prompt_text(req), add_bos=self.add_bos and not chat)
        # Jump-forward: a row's forced tokens go in its next step, as a prompt's do.
        return self._new_sequence(req, prompt_ids, self.eog_ids if chat else self.eos_ids, loop, True)

    # -- scheduler thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._slots:
                        self._cond.wait()
                    if self._stopping:
                        return
                    self._release_finished()  # first: a request that just ended leaves its cache to reuse
                    self._admit()
                try:
                    if self._slots:
                        self._step()
                except Exception as exc:  # a bug: fail the running requests, keep serving new ones
                    log.exception("llama.cpp decoding step failed")
                    for slot in self._slots:
                        if not slot.seq.finished:
                            slot.seq.deliver(ServeError(f"decoding failed: {type(exc).__name__}"))
                            slot.seq.cancel()
                    self._release_finished(broken=True)

    def _admit(self) -> None:
        """Give waiting requests a free sequence id (caller holds the condition). A finished request's
        keys and values stay in its sequence, so the free sequence sharing the longest prefix with the
        new prompt (the system prompt, the task's instructions) is reused and only the rest is computed,
        as llama.cpp's own server does with its slots."""
        while self._waiting and self._free_ids:
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            prompt = seq.prefill_ids  # with the tokens forced before the first one sampled
            shared = {i: common_prefix(self._cached.get(i, []), prompt) for i in self._free_ids}
            best = max(self._free_ids, key=shared.__getitem__)
            self._free_ids.remove(best)
            self._cached.pop(best, None)
            # At least the last prompt token is computed again: its logits choose the first answer token.
            common = min(shared[best], len(prompt) - 1)
            self._llama.llama_memory_seq_rm(self._memory, best, common, -1)
            self.reused_prompt_tokens += common
            self._slots.append(
                _Slot(seq, best, list(prompt[common:]), n_past=common, fed=list(prompt[:common]))
            )

    def _release_finished(self, broken: bool = False) -> None:
        keep = []
        for slot in self._slots:
            if slot.seq.finished or broken:
                if broken:  # the cache may hold half a step: forget it
                    self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                else:
                    self._cached[slot.seq_id] = slot.fed
                self._free_ids.append(slot.seq_id)
            else:
                keep.append(slot)
        self._slots = keep

    def _step(self) -> None:
        """One llama_decode over every running request: a token each, plus chunks of new prompts."""
        batch, room, n = self._batch, self.n_batch, 0
        for slot in self._slots:
            slot.meta["logit_at"] = None
        for slot in sorted(self._slots, key=lambda s: len(s.pending)):  # decoding rows first
            take = slot.pending[:room - n] if slot.pending else []  # fmt: skip
            for k, token in enumerate(take):
                batch.token[n] = token
                batch.pos[n] = slot.n_past + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = k == len(slot.pending) - 1  # logits only after a whole prompt
                n += 1
            slot.n_past += len(take)
            slot.fed.extend(take)
            slot.pending = slot.pending[len(take) :]
            slot.meta["logit_at"] = n - 1 if take and not slot.pending else None
            if n == room:
                break
        batch.n_tokens = n
        rc = self._llama.llama_decode(self._ctx.ctx, batch)
        self.decode_steps += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        ready = [s for s in self._slots if s.meta.get("logit_at") is not None]
        if not ready:
            return
        ready.sort(key=lambda s: s.meta["logit_at"])  # llama.cpp returns logits in batch order
        ptr = self._llama.llama_get_logits(self._ctx.ctx)
        logits = torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(len(ready), self.vocab)).copy())
        seqs = [s.seq for s in ready]
        chosen = choose_tokens(logits, seqs, self.guide, self._bitmask, self.tokenizer)
        for row, (slot, (token, logprob)) in enumerate(zip(ready, chosen, strict=True)):
            seq = slot.seq
            if seq.cancelled:
                continue
            # With jump-forward, the tokens the grammar forces next are fed with this one in the next step.
            delta, forced = seq.take(token, logprob)
            self._count_forced(len(forced))
            if not seq.finished and only_stop_allowed(self.guide, self._bitmask, row, seq, self.vocab):
                # A complete constrained answer: no decode step needed.
                delta = merge_deltas(delta, seq.finish_completed())
            seq.deliver(delta)
            if not seq.finished:
                slot.pending = [token, *forced]
