"""The transformers engine's forward passes as TorchScript graphs, run without holding Python's GIL.

    graphs = ForwardGraphs.build(model, pad_id)      # None when the model cannot be traced faithfully
    logits = graphs.prefill(ids, mask, pos, cache)   # fills `cache` (a DynamicCache, maybe seeded)
    logits = graphs.decode(ids, mask, pos, batch)    # one token per row of a RaggedBatch
    logits = graphs.extend(ids, mask, columns, rows, last, batch)  # several tokens for some rows

Why: every eager torch call releases the GIL for its kernel and takes it back after, so a decoding
thread beside a busy prefill thread (or the HTTP event loop) waits for the GIL hundreds of times per
step. A traced graph runs all its operations in C++ with the GIL released; it needs the GIL only to
start and to return. Measured on the embedded model (2 cores): a decoding loop beside a thread
prefilling prompts eagerly ran 25% slower; beside the same prefills as a traced graph, no slower.

`torch.jit.trace` is deprecated in torch 2.13 in favour of `torch.compile` and `torch.export`, but
neither runs a whole graph without the GIL on CPU (compiled code calls its kernels from Python;
AOTInductor needs a C++ toolchain and minutes of compilation at start). A trace records one path
through the model's Python code, so every input that could change that path is fixed here: the
mask is always the 4-D boolean one SDPA takes (built by the caller, no mask logic in the graph), the
prefill cache is always seeded (with zero tokens when no prefix is reused), and shapes are read from
tensors. `build` then checks the graphs against the eager model on inputs of other sizes than the
ones traced, and returns None (eager forward passes) on any difference.

Not traced: models with LoRA adapters loaded (PEFT routes each row through its adapter in Python),
attention other than SDPA, caches other than plain full-attention layers (`RaggedBatch` only).
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch
from transformers import DynamicCache

from medtune.serve.engines.kv_batch import (
    Prefix,
    PromptRow,
    RaggedBatch,
    last_logits,
    new_cache,
    prefill_inputs,
    prefill_mask,
    seed,
)

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # traced vs eager logits (same kernels: differences are rounding at most)


class _Prefill(torch.nn.Module):
    """Prompt tokens -> last-position logits and every layer's keys and values (prefix included)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, *prefix: torch.Tensor):
        cache = new_cache(self.model.config)
        seed(cache, list(prefix))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        return (out.logits[:, -1], *[t for layer in cache.layers for t in (layer.keys, layer.values)])


class _Decode(torch.nn.Module):
    """One token per row of a `RaggedBatch` -> logits; keys and values written into the batch's stores."""

    def __init__(self, model: Any, layout: list[tuple[tuple[int, int], tuple[int, int]]]) -> None:
        super().__init__()
        self.model = model
        self.layout = layout  # which store holds each layer's keys and values (`RaggedBatch.layout`)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor,
                columns: torch.Tensor, *stores: torch.Tensor) -> torch.Tensor:  # fmt: skip
        cache = RaggedBatch.cache_over(stores, self.layout, rows, columns, mask.shape[-1])
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1]


class _Extend(_Decode):
    """Several tokens for some rows of a `RaggedBatch` (jump-forward decoding: tokens the grammar forced)
    -> the logits after each row's last token; keys and values written into the batch's stores."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor,
                last: torch.Tensor, *stores: torch.Tensor) -> torch.Tensor:  # fmt: skip
        cache = RaggedBatch.cache_over(stores, self.layout, rows, columns, mask.shape[-1], several=True)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=columns, cache=cache,
                         use_cache=True)  # fmt: skip
        return last_logits(out.logits, last)


class ForwardGraphs:
    """The traced prefill and decoding forward passes of one model (see the module docstring)."""

    def __init__(self, prefill: Any, decode: Any, extend: Any, empty: list[torch.Tensor]) -> None:
        self._prefill = prefill
        self._decode = decode
        self._extend = extend
        self._empty = empty  # per layer, zero-token keys and values: an unseeded prefill's prefix

    @classmethod
    def build(cls, model: Any, pad_id: int) -> ForwardGraphs | None:
        """Trace `model` (call under inference mode) and check the graphs against it; None if they differ
        or it cannot be traced."""
        if not RaggedBatch.for_model(model.config).mask_4d:  # the graphs take SDPA's 4-D masks only
            return None
        vocab = model.config.get_text_config(decoder=True).vocab_size
        gen = torch.Generator().manual_seed(0)

        def prompts(rows: int, length: int, shared: int = 0) -> list[list[int]]:
            start = torch.randint(4, vocab, (shared,), generator=gen).tolist()
            return [
                start + torch.randint(4, vocab, (length - 3 * i,), generator=gen).tolist()
                for i in range(rows)
            ]

        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about the paths fixed above
                empty = _empty_prefix(model)
                args = _prefill_args(model, prompts(2, 12, shared=4), pad_id, reuse=4, empty=empty)
                prefill = torch.jit.trace(_Prefill(model), args, check_trace=False)
                batch = prefilled_batch(model, prompts(3, 10), pad_id)
                ids, mask, pos = batch.decode_inputs()
                args = (ids, mask, pos, *batch.step_indices(), *batch.stores)
                decode = torch.jit.trace(_Decode(model, batch.layout), args, check_trace=False)
                args = (*batch.extend_inputs([0, 2], prompts(2, 6), pad_id), *batch.stores)
                extend = torch.jit.trace(_Extend(model, batch.layout), args, check_trace=False)
            graphs = cls(prefill, decode, extend, empty)
            graphs._check(model, pad_id, prompts)
        except Exception as exc:  # a model the tracer cannot follow: eager forward passes
            log.info("forward passes stay eager (tracing failed: %s: %s)", type(exc).__name__, exc)
            return None
        log.info("forward passes traced and checked in %.1f s", time.perf_counter() - start)
        return graphs

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Last-position logits of a prefill (inputs from `prefill_inputs`, `mask` the 2-D one); the
        cache, seeded with a reused prefix or not, gets every layer's keys and values."""
        prefix = _prefix_of(cache, self._empty, ids.shape[0])
        logits, *kv = self._prefill(ids, prefill_mask(mask, ids.shape[1]), pos, *prefix)
        seed(cache, kv)
        return logits

    def decode(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, batch: RaggedBatch
    ) -> torch.Tensor:
        """Last-position logits of a decoding step (inputs from `batch.decode_inputs()`)."""
        return self._decode(ids, mask, pos, *batch.step_indices(), *batch.stores)

    def extend(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        columns: torch.Tensor,
        rows: torch.Tensor,
        last: torch.Tensor,
        batch: RaggedBatch,
    ) -> torch.Tensor:
        """Several tokens for some rows (inputs from `batch.extend_inputs`): their keys and values
        written, the logits after each row's last token returned."""
        return self._extend(ids, mask, columns, rows, last, *batch.stores)

    def _check(self, model: Any, pad_id: int, prompts: Any) -> None:
        """Compare with the eager model on other sizes than the traced ones; raise on a difference."""
        for rows, length, reuse in ((1, 20, 0), (3, 16, 5)):
            seqs = prompts(rows, length, shared=reuse)
            args = _prefill_args(model, seqs, pad_id, reuse, self._empty)
            _same(self._prefill(*args), _Prefill(model)(*args), f"prefill of {rows} x {length} tokens")
            eager, traced = prefilled_batch(model, seqs, pad_id), prefilled_batch(model, seqs, pad_id)
            for _ in range(3):
                ids, mask, pos = eager.decode_inputs()
                want = _Decode(model, eager.layout)(ids, mask, pos, *eager.step_indices(), *eager.stores)
                got = self.decode(*traced.decode_inputs(), traced)
                _same((got,), (want,), f"decoding step of {rows} rows")
                eager.advance(want.argmax(-1))
                traced.advance(want.argmax(-1))
            # Jump-forward: a few tokens for the first and last rows; the next step must see them.
            extended = sorted({0, rows - 1})
            forced = prompts(len(extended), 5)
            got_want = []
            for batch, graph in ((traced, self._extend), (eager, _Extend(model, eager.layout))):
                got_want.append(graph(*batch.extend_inputs(extended, forced, pad_id), *batch.stores))
                batch.extended(extended, [len(t) for t in forced])
            _same(got_want[:1], got_want[1:], f"extension of {len(extended)} of {rows} rows")
            ids, mask, pos = eager.decode_inputs()
            want = _Decode(model, eager.layout)(ids, mask, pos, *eager.step_indices(), *eager.stores)
            got = self.decode(*traced.decode_inputs(), traced)
            _same((got,), (want,), f"decoding step of {rows} rows after extending {len(extended)}")


def _empty_prefix(model: Any) -> list[torch.Tensor]:
    """Per layer, zero-token keys and values [1, heads, 0, dim] (what an unseeded prefill starts from)."""
    device = next(model.parameters()).device
    cache = new_cache(model.config)
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), cache=cache, use_cache=True)
    return [t[:, :, :0] for layer in cache.layers for t in (layer.keys, layer.values)]


def _prefix_of(cache: DynamicCache, empty: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """The keys and values a prefill cache was seeded with (`prefill_inputs`), zero tokens if none."""
    if cache.layers[0].is_initialized:
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t.expand(rows, -1, -1, -1) for t in empty]


def _prefill_args(
    model: Any, seqs: list[list[int]], pad_id: int, reuse: int, empty: list[torch.Tensor]
) -> tuple:
    device = next(model.parameters()).device
    prefix = None
    if reuse:
        prefix_cache = new_cache(model.config)
        model(input_ids=torch.tensor([seqs[0][:reuse]], device=device), cache=prefix_cache, use_cache=True)
        prefix = Prefix(seqs[0][:reuse], [(layer.keys[0], layer.values[0]) for layer in prefix_cache.layers])
    ids, mask, pos, cache = prefill_inputs([PromptRow(s) for s in seqs], pad_id, model.config, prefix, reuse)
    kv = _prefix_of(cache, empty, len(seqs))
    mask = mask.to(device)
    return (ids.to(device), prefill_mask(mask, ids.shape[1]), pos.to(device), *kv)


def prefilled_batch(model: Any, seqs: list[list[int]], pad_id: int) -> RaggedBatch:
    """`seqs` (token ids) prefilled eagerly together into a new `RaggedBatch`, as the engine would batch
    them (call under inference mode): tracing, its checks and the serving benchmark start from one."""
    device = next(model.parameters()).device
    rows = [PromptRow(s) for s in seqs]
    ids, mask, pos, cache = prefill_inputs(rows, pad_id, model.config)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                   cache=cache, use_cache=True, logits_to_keep=1).logits  # fmt: skip
    batch = RaggedBatch.for_model(model.config)
    batch.add(cache, mask, rows, logits[:, -1].argmax(-1))
    return batch


def _same(got: tuple, want: tuple, what: str) -> None:
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or not torch.allclose(g, w, atol=TOLERANCE, rtol=TOLERANCE):
            raise ValueError(f"the traced {what} differs from the eager model")
