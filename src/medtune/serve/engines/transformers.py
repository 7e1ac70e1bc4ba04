"""The embedded serving engine: a transformers causal LM with continuous batching, on CPU or GPU.

    engine = TransformersEngine("runs/aria/dpo", adapters={"derm": "adapters/derm"},
                                options=EngineOptions(max_batch_size=16, max_queue=64))
    engine.start()          # loads the model and starts the scheduler thread

A decoding thread decodes every running request together, one token per step, over one shared KV
cache (`kv_batch.RaggedBatch`). New requests join between steps: they are prefilled together (left
padding, attention mask, position ids counted from each row's first real token) and their cache rows
are copied in; finished rows leave. On a CPU with cores for two model threads (a small model decodes
on one thread: two cores), prefills run on a second thread while the running requests keep decoding
(`overlap_prefill`), so that a new prompt does not stall everyone's next token; otherwise the decoding
thread prefills between two steps. Both threads run the model as traced graphs, which hold no GIL
while they compute (`graphs.ForwardGraphs`; not for models that do not trace faithfully, nor while
LoRA adapters are loaded). Every row keeps its own sampling settings, stop strings, seed, xgrammar
matcher and LoRA adapter (PEFT mixed-batch forward), so greedy output is the same alone or batched.
Jump-forward decoding: text a row's grammar forces (a JSON key, the rest of an enum value) is accepted
at once (`Sequence.forced_tokens`) and its tokens fed in one forward pass before the next step
(`_extend`); what is forced at the very start goes in with the prompt (`Sequence.force_start`).
The event loop only tokenises, validates and waits on a per-request queue; the bounded waiting queue
turns overload into `QueueFull` (HTTP 429).

Why not transformers' own `ContinuousBatchingManager` or `generate()`: neither lets each request of
one batch carry its own grammar matcher and its own adapter, which is the point of this server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from medtune.errors import MedtuneError, ModelError
from medtune.serve.adapters import AdapterSet
from medtune.serve.engines.base import (
    EngineOptions,
    GenerationRequest,
)
from medtune.serve.engines.graphs import ForwardGraphs
from medtune.serve.engines.kv_batch import (
    FixedBatch,
    Prefix,
    RaggedBatch,
    last_logits,
    new_cache,
    plain_layers,
    prefill_inputs,
)
from medtune.serve.engines.queued import QueuedEngine
from medtune.serve.engines.sequence import (
    Sequence,
    choose_tokens,
    deliver_all,
    merge_deltas,
    only_stop_allowed,
)
from medtune.serve.errors import Conflict, ModelNotFound, ServeError, ShuttingDown
from medtune.serve.guided import Guide

log = logging.getLogger(__name__)

MIN_PREFIX = 16  # shorter shared prefixes are recomputed: copying their cache would not pay
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Prefilled(NamedTuple):
    """Rows prefilled together, to join the running batch: their cache, mask and next input tokens."""

    cache: DynamicCache
    mask: torch.Tensor
    seqs: list[Sequence]
    tokens: torch.Tensor


def _on_host(logits: torch.Tensor) -> torch.Tensor:
    """Logits as sampling takes them: float32, on the CPU."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    return logits if logits.device.type == "cpu" else logits.cpu()


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TransformersEngine(QueuedEngine):
    name = "transformers"

    def __init__(
        self, model: str, adapters: dict[str, str] | None = None, options: EngineOptions | None = None
    ) -> None:
        super().__init__(options)
        self.model_path = str(model)
        self._initial_adapters = dict(adapters or {})
        self.loaded = False
        self.adapters: AdapterSet | None = None
        self._model_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._batch: RaggedBatch | FixedBatch = FixedBatch()  # the rows decoding now (set at start)
        self._prefilling = 0  # rows admitted and being prefilled (counted as running)
        self._ready: list[Prefilled] = []  # waiting for the decoding thread to join them to the batch
        self._prefill_thread: threading.Thread | None = None
        self._prefill_lock = threading.Lock()  # held while the prefill thread runs the model
        self._forward_lock = threading.Lock()  # PEFT's per-row adapter hooks: one forward at a time
        # Prefix caching: per adapter, the last prompt prefilled. Requests that share a system prompt
        # (every ARIA call) start from its keys and values instead of recomputing them.
        self._prefixes: dict[str | None, Prefix] = {}
        self._prefix_ok = False  # set at start: plain attention layers only (`plain_layers`)
        self._graphs: ForwardGraphs | None = None  # traced forward passes (no adapter loaded)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self.loaded:
            return
        path = Path(self.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"--model: {path} is not a model folder (no config.json)")
        opts = self.options
        device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if opts.dtype == "auto":
            dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        elif opts.dtype in _DTYPES:
            dtype = _DTYPES[opts.dtype]
        else:
            raise ModelError(f"--dtype: expected auto, {', '.join(_DTYPES)}; found {opts.dtype!r}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"--model: cannot load {path}: {exc}") from None
        if getattr(self.tokenizer, "backend_tokenizer", None) is None:
            raise ModelError(
                f"--model: {path}: the tokenizer has no tokenizer.json (a fast tokenizer is needed)"
            )
        self.device = torch.device(device)
        model.to(self.device).eval()
        self.adapters = AdapterSet(model)
        config = model.config.get_text_config(decoder=True)
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self._max_context = min(opts.max_model_len or limit, limit)
        self.eos_ids = self._eos_ids(model)
        self.turn_end_ids, self.turn_end_texts = self._turn_ends()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids) if self.eos_ids else 0
        self.vocab = model.get_output_embeddings().weight.shape[0]
        # CPU threads for the scheduler thread only (OpenMP settings are per thread). A small model's
        # matmuls are too short to pay for OpenMP barriers, and on a busy machine a team of threads
        # waiting for a descheduled member is ~10x slower than one thread: small models get one.
        n_params = sum(p.numel() for p in model.parameters())
        self._threads = opts.threads or (1 if device == "cpu" and n_params < 50_000_000 else None)
        stops = sorted(self.eos_ids | self.turn_end_ids)
        self.guide = Guide(self.tokenizer, vocab_size=self.vocab, stop_token_ids=stops)
        self._bitmask = self.guide.allocate(opts.max_batch_size)
        plain = plain_layers(new_cache(model.config))
        self._prefix_ok = opts.prefix_caching and plain
        self._batch = RaggedBatch.for_model(model.config) if plain else FixedBatch()
        if plain and not opts.enforce_eager:
            # Traced before any adapter is loaded: the graphs are the base model's, used while no
            # adapter is loaded (PEFT leaves the base weights as they are).
            if self._threads:
                torch.set_num_threads(self._threads)  # tracing runs the model: as it will run
            with torch.inference_mode():
                self._graphs = ForwardGraphs.build(model, self.pad_id)
        for name, adapter_path in self._initial_adapters.items():
            self.adapters.load(name, adapter_path)
        self.loaded = True
        self._thread = threading.Thread(target=self._run, name="medtune-scheduler", daemon=True)
        self._thread.start()
        # Overlap when the two threads can each have their own cores (small models decode on one thread).
        threads = self._threads or torch.get_num_threads()
        if opts.overlap_prefill and plain and device == "cpu" and 2 * threads <= _cores():
            self._prefill_bitmask = self.guide.allocate(opts.max_batch_size)  # its own: both threads sample
            self._prefill_thread = threading.Thread(
                target=self._run_prefill, name="medtune-prefill", daemon=True
            )
            self._prefill_thread.start()
        log.info(
            "transformers engine: %s on %s (%s), context %d, batch %d, queue %d",
            path, device, str(dtype).removeprefix("torch."), self._max_context, opts.max_batch_size, opts.max_queue,
        )  # fmt: skip

    def _eos_ids(self, model: Any) -> set[int]:
        ids: set[int] = set()
        gen = getattr(model, "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def _turn_ends(self) -> tuple[set[int], list[str]]:
        """What ends an assistant turn under the chat template besides EOS (e.g. <end_of_turn>):
        single tokens stop chat requests like EOS does, other text becomes a stop string."""
        from medtune.data.templates import end_of_turn_tokens

        try:
            ends = end_of_turn_tokens(self.tokenizer)
        except MedtuneError:  # no chat template: only plain completions make sense
            return set(), []
        ids, texts = set(), []
        for text in ends:
            encoded = self.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
            else:
                texts.append(text)
        return ids - self.eos_ids, texts

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in (self._thread, self._prefill_thread):
            if thread is not None:
                thread.join(timeout=30)
        left = list(self._waiting) + self._batch.rows + self._joining()
        deliver_all([(s, ShuttingDown("the server stopped before this request finished")) for s in left])
        self._waiting.clear()
        self._batch.clear()
        self._ready.clear()

    def health(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "engine": self.name,
            "model": self.model_path,
            "adapters": sorted(self.adapters.paths) if self.adapters else [],
            "device": str(getattr(self, "device", "")),
        }

    # -- text ----------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text, add_special_tokens=False))

    @property
    def max_context(self) -> int:
        return self._max_context

    # -- adapters ------------------------------------------------------------------------------------

    def list_adapters(self) -> dict[str, str]:
        return dict(self.adapters.paths) if self.adapters else {}

    def load_adapter(self, name: str, path: str) -> None:
        with self._model_lock, self._prefill_lock:  # between two decoding steps and two prefills
            self.adapters.load(name, path)
            self._prefixes.pop(name, None)  # computed with the adapter this one replaces

    def unload_adapter(self, name: str) -> None:
        with self._model_lock, self._prefill_lock:
            queued = list(self._waiting) + self._batch.rows + self._joining()
            busy = [s for s in queued if s.req.adapter == name and not s.finished]
            if busy:
                raise Conflict(
                    f"adapter {name!r} has {len(busy)} request(s) in flight; retry when they finish"
                )
            self.adapters.unload(name)
            self._prefixes.pop(name, None)

    # -- requests ------------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._batch) + self._prefilling + len(self._joining())

    def _joining(self) -> list[Sequence]:
        """Rows prefilled and waiting to join the batch."""
        return [s for r in self._ready for s in r.seqs]

    def _prepare(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> Sequence:
        if not self.loaded or self._stopping:
            raise ShuttingDown("the model is not loaded or the server is stopping")
        if req.adapter is not None and req.adapter not in self.adapters.paths:
            raise ModelNotFound(f"no adapter named {req.adapter!r} is loaded", param="model")
        chat = req.prompt is None
        prompt_ids = self.encode(self.prompt_text(req), add_special_tokens=not chat)
        eos = self.eos_ids | self.turn_end_ids if chat else self.eos_ids
        # Several tokens per row: a RaggedBatch with SDPA's 4-D masks (`RaggedBatch.extend_inputs`).
        return self._new_sequence(req, prompt_ids, eos, loop, getattr(self._batch, "mask_4d", False))

    # -- scheduler thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        """The decoding thread: joins prefilled rows to the batch and decodes one token per row per step
        (and prefills new requests itself when there is no prefill thread)."""
        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._ready or self._batch.rows
                               or (self._waiting and self._prefill_thread is None)):  # fmt: skip
                        self._cond.wait()
                    if self._stopping:
                        return
                    admit = []
                    if self._prefill_thread is None:
                        admit = self._admit()
                        self._prefilling = len(admit)
                try:
                    with self._model_lock:
                        dropped = self._batch.drop_finished()
                        if admit:
                            self._prefill(admit, self._bitmask)
                            self._prefilling = 0
                        self._join_ready()
                        if self._batch.rows:
                            dropped += self._decode()
                    if dropped and self._prefill_thread is not None:
                        with self._cond:
                            self._cond.notify_all()  # room for the prefill thread
                except Exception as exc:  # a bug or OOM: fail the batch, keep serving the next ones
                    log.exception("decoding step failed")
                    with self._cond:  # rows that were to join the batch fail with it
                        joining = self._joining()
                        self._ready.clear()
                    self._fail(self._batch.rows + admit + joining, exc)
                    self._batch.clear()
                    if self._prefill_thread is None:
                        self._prefilling = 0

    def _run_prefill(self) -> None:
        """The prefill thread (CPU, cores for two model threads): prefills waiting requests while the decoding
        thread decodes the running ones, so that a new request's prompt does not stall everyone's next
        token. Both threads run the model on one core each (torch releases the GIL inside its ops)."""
        if self._threads:
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not (self._waiting and self._room() > 0):
                        self._cond.wait()
                    if self._stopping:
                        return
                    admit = self._admit()
                    self._prefilling = len(admit)
                try:
                    with self._prefill_lock:
                        self._prefill(admit, self._prefill_bitmask)
                except Exception as exc:
                    log.exception("prefill failed")
                    self._fail(admit, exc)
                finally:
                    with self._cond:
                        self._prefilling = 0
                        self._cond.notify_all()

    def _fail(self, seqs: list[Sequence], exc: Exception) -> None:
        failed = [s for s in seqs if not s.finished]
        deliver_all([(s, ServeError(f"decoding failed: {type(exc).__name__}")) for s in failed])
        for seq in failed:
            seq.cancel()

    def _room(self) -> int:
        """Batch rows free for waiting requests (caller holds the condition). Models whose cache rows
        cannot be joined (`FixedBatch`) start new requests only when the batch is empty."""
        if not self._batch.can_merge():
            return 0
        return self.options.max_batch_size - self.running

    def _admit(self) -> list[Sequence]:
        """Waiting requests that start now (caller holds the condition)."""
        room = self._room()
        admit = []
        while self._waiting and len(admit) < room:
            seq = self._waiting.popleft()
            if not seq.cancelled:
                admit.append(seq)
        return admit

    def _join_ready(self) -> None:
        """Prefilled rows join the running batch (under the condition: they are counted once)."""
        with self._cond:
            while self._ready:
                self._batch.add(*self._ready[0])
                self._ready.pop(0)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
                 seqs: list[Sequence], prefill: bool) -> torch.Tensor:  # fmt: skip
        """Last-position logits (float32, CPU) for every row, each through its own adapter; through the
        traced graphs when there are (and no adapter is loaded)."""
        on = self.device
        ids, mask, pos = (t if t.device == on else t.to(on) for t in (ids, mask, pos))
        if self._graphs is not None and not self.adapters.paths:
            if prefill:
                logits = self._graphs.prefill(ids, mask, pos, cache)
            else:
                logits = self._graphs.decode(ids, mask, pos, self._batch)
        else:
            logits = self._eager(ids, mask, pos, cache, seqs, logits_to_keep=1)[:, -1, :]
        return _on_host(logits)

    def _eager(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
               seqs: list[Sequence], logits_to_keep: int) -> torch.Tensor:  # fmt: skip
        """The model's logits, run eagerly, each row through its own adapter (PEFT's per-row hooks: one
        forward pass at a time while adapters are loaded)."""
        with self._forward_lock if self.adapters.paths else contextlib.nullcontext():
            return self.adapters.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **self.adapters.forward_kwargs([s.req.adapter for s in seqs]),
            ).logits

    def _prefill(self, seqs: list[Sequence], bitmask: torch.Tensor) -> None:
        gone = [s for s in seqs if s.req.adapter is not None and s.req.adapter not in self.adapters.paths]
        if gone:  # unloaded between the request's arrival and its turn
            deliver_all([(s, ModelNotFound(f"adapter {s.req.adapter!r} was unloaded", param="model"))
                         for s in gone])  # fmt: skip
            seqs = [s for s in seqs if s not in gone]
            if not seqs:
                return
        adapter = seqs[0].req.adapter
        prefix = self._prefixes.get(adapter) if self._prefix_ok else None
        reuse = 0
        if prefix is not None and all(s.req.adapter == adapter for s in seqs):
            reuse = prefix.shared_with(seqs)
            reuse = reuse if reuse >= MIN_PREFIX else 0
            self.reused_prompt_tokens += reuse * len(seqs)
        config = self.adapters.model.config
        ids, mask, pos, cache = prefill_inputs(seqs, self.pad_id, config, prefix, reuse)
        t0 = time.perf_counter()
        logits = self._forward(ids, mask, pos, cache, seqs, prefill=True)
        log.debug("prefill %d x %d tokens (+%d cached) in %.1f ms", *ids.shape, reuse,
                  1000 * (time.perf_counter() - t0))  # fmt: skip
        if self._prefix_ok:
            self._prefixes[adapter] = Prefix.of_row(seqs[0], cache, mask, 0)
        tokens = self._step(seqs, logits, bitmask)
        keep = [i for i, s in enumerate(seqs) if not s.finished]
        if keep:
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
            with self._cond:
                self._ready.append(Prefilled(cache, mask[keep], [seqs[i] for i in keep], tokens[keep]))
                self._cond.notify_all()

    def _decode(self) -> int:
        """One token for every running row; return how many rows finished."""
        dropped = self._extend()
        if not self._batch.rows:
            return dropped
        ids, mask, pos = self._batch.decode_inputs()
        logits = self._forward(ids, mask, pos, self._batch.cache, self._batch.rows, prefill=False)
        self._batch.advance(self._step(self._batch.rows, logits, self._bitmask))
        return dropped + self._batch.drop_finished()

    def _extend(self) -> int:
        """Feed the tokens jump-forward decoding accepted (`Sequence.pending`) to their rows, all such rows
        in one forward pass, and choose each one's next token from the logits after its last: the step
        that follows decodes it with the other rows. Return how many rows finished."""
        batch = self._batch
        while rows := [i for i, seq in enumerate(batch.rows) if seq.pending and not seq.finished]:
            seqs = [batch.rows[i] for i in rows]
            ids, mask, columns, at, last = batch.extend_inputs(rows, [s.pending for s in seqs], self.pad_id)
            if self._graphs is not None and not self.adapters.paths:
                logits = self._graphs.extend(ids, mask, columns, at, last, batch)
            else:
                width = mask.shape[-1]
                cache = RaggedBatch.cache_over(batch.stores, batch.layout, at, columns, width, several=True)
                logits = last_logits(self._eager(ids, mask, columns, cache, seqs, logits_to_keep=0), last)
            counts = [len(s.pending) for s in seqs]
            for seq in seqs:
                seq.pending = []
            batch.extended(rows, counts, self._step(seqs, _on_host(logits), self._bitmask))  # may force more
        return batch.drop_finished()

    def _step(self, seqs: list[Sequence], logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """Choose, record and deliver each row's next token; return the tokens (the next inputs).

        With jump-forward decoding, the tokens the grammar then forces are accepted too: they wait in
        `pending`, with the chosen one, for `_extend`."""
        chosen = choose_tokens(logits, seqs, self.guide, bitmask, self.tokenizer)
        out = []
        for i, (seq, (token, logprob)) in enumerate(zip(seqs, chosen, strict=True)):
            if seq.cancelled:
                continue
            delta, forced = seq.take(token, logprob)
            self._count_forced(len(forced))
            if forced and not seq.finished:
                seq.pending = [token, *forced]  # `_extend` feeds them and chooses the next input
            if not seq.finished and only_stop_allowed(self.guide, bitmask, i, seq, self.vocab):
                # The answer is complete; skip the forward pass that could only produce a stop token.
                delta = merge_deltas(delta, seq.finish_completed())
            out.append((seq, delta))
        deliver_all(out)
        return torch.tensor([t for t, _ in chosen], dtype=torch.long)
