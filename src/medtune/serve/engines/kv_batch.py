"""The rows the transformers engine decodes together, and their KV cache.

    ids, mask, pos, cache = prefill_inputs(new_seqs, pad_id, config)   # left-padded prompts
    ... forward, sample first tokens ...
    batch = RaggedBatch.for_model(config)
    batch.add(cache, mask, new_seqs, first_tokens)     # join the running rows (continuous batching)
    ids, mask, pos = batch.decode_inputs()             # one token per row
    logits = model(ids, attention_mask=mask, position_ids=pos, cache=batch.cache, ...)
    batch.advance(next_tokens); batch.drop_finished()

New requests are prefilled together in a cache of their own: prompts left-padded to a common length,
a 2-D attention mask hiding the padding, position ids counting only each row's real tokens, so that
a row's numbers do not depend on its neighbours (greedy output is the same alone or batched).

`RaggedBatch` (models whose layers are plain full-attention ones) keeps the running rows in
preallocated buffers [rows, heads, columns, dim]: row i holds its tokens in columns [0, len_i), with
no padding, and a decoding step writes each row's new key and value at its own column, in place.
Joining copies only the new rows in; a finished row's slot is refilled with the last row (one row
copied). The mask is each row's own length. transformers' `DynamicLayer` instead copies the whole
cache every step (`torch.cat`), and merging left-padded caches copies it at every join and departure:
measured on the embedded model with 8 clients, those copies were ~4 ms of the ~25 ms each request
cost the decoding thread. Jump-forward decoding appends several tokens to some rows in one forward
pass (`extend_inputs`, `extended`), in place as well.

`FixedBatch` (sliding-window, linear-attention and other caches, which cannot be padded or joined
safely): the rows prefilled together decode together until they end; new requests wait for the
next batch (dynamic batching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from medtune.serve.engines.sequence import Sequence, common_prefix


class PromptRow:
    """The part of a `Sequence` that prefills and batches read: a prompt's token ids and whether the row
    is done (to prefill prompts outside the engine: tracing, tests, benchmarks)."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = self.prefill_ids = prompt_ids
        self.finished = False


@dataclass
class Prefix:
    """A prompt already prefilled: its token ids and, per layer, their keys and values [heads, tokens, dim]."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def shared_with(self, seqs: list[Sequence]) -> int:
        """How many leading tokens every prompt of `seqs` shares with this one (each keeps at least one
        token of its own to prefill: its logits give the first output token)."""
        shared = len(self.ids)
        for s in seqs:
            shared = min(shared, common_prefix(self.ids, s.prefill_ids), len(s.prefill_ids) - 1)
        return shared

    @classmethod
    def of_row(cls, seq: Sequence, cache: DynamicCache, mask: torch.Tensor, row: int) -> Prefix:
        """Row `row`'s prompt as just prefilled (its real columns only, copied out of the batch)."""
        cols = mask[row].nonzero().flatten().to(cache.layers[0].keys.device)
        layers = [(layer.keys[row].index_select(1, cols), layer.values[row].index_select(1, cols))
                  for layer in cache.layers]  # fmt: skip
        return cls(list(seq.prefill_ids), layers)


def prefill_inputs(
    seqs: list[Sequence], pad_id: int, config: Any, prefix: Prefix | None = None, reuse: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """Left-padded prompt ids, attention mask, position ids and a fresh cache for `seqs`.

    With `prefix` and `reuse` > 0, the first `reuse` tokens of every prompt (shared with `prefix`) are
    not computed again: the cache starts with their keys and values, and only the rest of each prompt
    is fed, left-padded after them (the mask hides the padding, positions continue from `reuse`)."""
    rest = [s.prefill_ids[reuse:] for s in seqs]
    width = max(len(r) for r in rest)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), reuse + width), dtype=torch.long)
    mask[:, :reuse] = 1
    for i, r in enumerate(rest):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, reuse + width - len(r) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, reuse:]
    cache = new_cache(config)
    if reuse:
        seed(cache, [t[:, :reuse].unsqueeze(0).expand(len(seqs), -1, -1, -1) for pair in prefix.layers
                     for t in pair])  # fmt: skip
    return ids, mask, pos, cache


def seed(cache: DynamicCache, tensors: list[torch.Tensor]) -> None:
    """Set a prefill cache's keys and values: `tensors` is keys, values of layer 0, then of layer 1, ...
    (a `DynamicLayer` concatenates what its next update brings after them)."""
    for layer, k, v in zip(cache.layers, tensors[0::2], tensors[1::2], strict=True):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v


def prefill_mask(mask: torch.Tensor, new: int) -> torch.Tensor:
    """The 4-D boolean mask [rows, 1, new, columns] SDPA takes for a prefill whose 2-D `mask` (from
    `prefill_inputs`) ends with the `new` tokens fed: each token sees the real tokens up to itself.
    A padding token that would see nothing sees every column instead (its output is never used, and
    a fully masked row would make SDPA return NaN)."""
    columns = mask.shape[-1]
    at = torch.arange(columns, device=mask.device)
    causal = at[None, :] <= at[columns - new :, None]
    allowed = causal[None] & mask[:, None, :].bool()
    allowed |= ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def last_logits(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Row i's logits [vocab] at position `last[i]` of `logits` [rows, tokens, vocab]."""
    return logits.gather(1, last.view(-1, 1, 1).expand(-1, 1, logits.shape[-1]))[:, 0]


def plain_layers(cache: DynamicCache) -> bool:
    """True when every layer is a plain full-attention one: such caches can be seeded with a cached
    prefix and their rows decoded in a `RaggedBatch`. Sliding-window or linear-attention layers cannot."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def new_cache(config: Any) -> DynamicCache:
    """A fresh cache for a prefill (the model's own layer types)."""
    return DynamicCache(config=config)


class RaggedLayer(DynamicLayer):
    """One layer of a `RaggedBatch`'s cache: row i's keys and values fill columns [0, len_i) of row i of
    preallocated buffers; `update` writes each row's one new token at column len_i, in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.buffers = (keys, values)
        self.device = keys.device
        self.is_initialized = True
        self.rows = torch.zeros(0, dtype=torch.long)  # set by the batch before each step:
        self.columns = torch.zeros(0, dtype=torch.long)  # where each row's new token goes
        self.width = 1  # columns the step attends to (the longest row, new token included)
        self.several = False  # several tokens for some rows: `rows` [k] any, `columns` [k, tokens]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.buffers
        if self.several:  # jump-forward: rows[i] gets its tokens at columns[i, :]
            rows = self.rows[:, None]
            keys[rows, :, self.columns] = key_states.transpose(1, 2)
            values[rows, :, self.columns] = value_states.transpose(1, 2)
            self.keys = keys[:, :, : self.width].index_select(0, self.rows)
            self.values = values[:, :, : self.width].index_select(0, self.rows)
            return self.keys, self.values
        if key_states.shape[-2] != 1:
            raise ValueError("a RaggedLayer takes one new token per row (prefill in a DynamicCache)")
        keys[self.rows, :, self.columns] = key_states[:, :, 0]
        values[self.rows, :, self.columns] = value_states[:, :, 0]
        n = self.rows.shape[0]  # from the tensor, not len(): a traced graph keeps it variable
        self.keys, self.values = keys[:n, :, : self.width], values[:n, :, : self.width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.width - 1  # before this step's token: the mask then covers `width` columns


class RaggedBatch:
    """The running rows, decoded together over one cache of `RaggedLayer`s (continuous batching)."""

    def __init__(self, mask_4d: bool = False) -> None:
        self.mask_4d = mask_4d  # decode_inputs gives the 4-D boolean mask SDPA takes, ready-made
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None  # buffers kept when the batch empties, reused
        self.stores: list[torch.Tensor] = []  # what the layers' buffers are views of (`_reserve`)
        self.layout: list = []  # which store holds each layer's keys and values (`cache_over`)
        self.lengths = torch.zeros(0, dtype=torch.long)  # tokens in the cache, per row
        self.next = torch.zeros(0, dtype=torch.long)  # each row's next input token

    @classmethod
    def for_model(cls, config: Any) -> RaggedBatch:
        """The batch the engine decodes `config`'s model with (a ready 4-D mask under SDPA attention)."""
        return cls(mask_4d=getattr(config, "_attn_implementation", None) == "sdpa")

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows, self.cache, self.stores, self.layout = [], None, [], []
        self.lengths = self.next = torch.zeros(0, dtype=torch.long)

    def can_merge(self) -> bool:
        return True

    def _reserve(self, rows: int, columns: int, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Buffers with room for `rows` x `columns` (grown by copying the rows in use when too small);
        `like` gives each layer's keys and values [batch, heads, tokens, dim] (shapes, dtype, device).

        The layers' buffers are views of a few stores [tensors, rows, heads, columns, dim], one per
        shape of tensor (heads, dim, dtype, device): moving a row is one copy per store, not one per
        layer and tensor (each torch call is a GIL hand-off for the threads around the decoder)."""
        have = self.cache.layers[0].buffers[0].shape if self.cache is not None else None
        if have is not None and have[0] >= rows and have[2] >= columns:
            return
        # Grow what is short (rows double, columns get half again or 64 spare), keep the rest.
        rows = have[0] if have and rows <= have[0] else max(rows, 2 * have[0] if have else 4)
        columns = have[2] if have and columns <= have[2] else columns + max(64, columns // 2)
        n, width = len(self.rows), int(self.lengths.max()) if self.rows else 0
        # One store per shape of tensor (keys and values of every layer, for a uniform model).
        kinds: dict[tuple, list[tuple[int, int]]] = {}
        for i, pair in enumerate(like):
            for j, t in enumerate(pair):
                kinds.setdefault((t.shape[1], t.shape[3], t.dtype, t.device), []).append((i, j))
        layout: list[list[Any]] = [[None, None] for _ in like]
        stores = []
        for s, ((heads, dim, dtype, device), members) in enumerate(kinds.items()):
            store = torch.zeros((len(members), rows, heads, columns, dim), dtype=dtype, device=device)
            for m, (i, j) in enumerate(members):
                if n:
                    store[m, :n, :, :width] = self.cache.layers[i].buffers[j][:n, :, :width]
                layout[i][j] = (s, m)
            stores.append(store)
        self.stores = stores
        self.layout = [tuple(pair) for pair in layout]
        self.cache = self.cache_over(stores, self.layout)

    @staticmethod
    def cache_over(stores: Any, layout: list, rows: Any = None, columns: Any = None, width: Any = None,
                   several: bool = False) -> DynamicCache:  # fmt: skip
        """A cache of `RaggedLayer`s whose buffers are views of `stores`: layer i's keys are
        `stores[s][m]` for `(s, m) = layout[i][0]`, its values likewise with `layout[i][1]`; with `rows`,
        `columns` and `width`, ready for a step (`several`: an `extend_inputs` one)."""
        cache = DynamicCache()
        cache.layers = [RaggedLayer(*(stores[s][m] for s, m in pair)) for pair in layout]
        if rows is not None:
            for layer in cache.layers:
                layer.rows, layer.columns, layer.width, layer.several = rows, columns, width, several
        return cache

    def step_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where this step's new keys and values go: each row's index and column (`decode_inputs` first)."""
        layer = self.cache.layers[0]
        return layer.rows, layer.columns

    def add(self, cache: DynamicCache, mask: torch.Tensor, seqs: list[Sequence], nxt: torch.Tensor) -> None:
        """Copy freshly prefilled rows (their cache, left-padded under `mask`) in after the running ones."""
        lengths = mask.sum(-1).cpu()
        first = len(self.rows)
        self._reserve(first + len(seqs), int(lengths.max()) + 1, [(x.keys, x.values) for x in cache.layers])
        device = self.cache.layers[0].device
        columns = [row.nonzero().flatten().to(device) for row in mask]  # each row's real tokens
        for layer, new in zip(self.cache.layers, cache.layers, strict=True):
            for buf, src in zip(layer.buffers, (new.keys, new.values), strict=True):
                for j, cols in enumerate(columns):
                    n = len(cols)
                    buf[first + j, :, :n] = src[j] if n == src.shape[2] else src[j].index_select(1, cols)
        self.rows = self.rows + list(seqs)
        self.lengths = torch.cat([self.lengths, lengths])
        self.next = torch.cat([self.next, nxt.cpu()])

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids [rows, 1], the mask (each row's tokens and its new one), each row's next position.

        The mask is [rows, columns] (1 = attend), or with `mask_4d` the [rows, 1, 1, columns] boolean
        mask that transformers would build from it for SDPA (a 4-D mask is taken as is: the model skips
        its mask construction, ~5% of a small model's decoding step)."""
        width = int(self.lengths.max()) + 1
        self._reserve(len(self.rows), width, [layer.buffers for layer in self.cache.layers])
        device = self.cache.layers[0].device
        rows, columns = torch.arange(len(self.rows), device=device), self.lengths.to(device)
        for layer in self.cache.layers:
            layer.rows, layer.columns, layer.width = rows, columns, width
        mask = torch.arange(width)[None, :] <= self.lengths[:, None]
        mask = mask[:, None, None, :] if self.mask_4d else mask.long()
        return self.next.view(-1, 1), mask, self.lengths.view(-1, 1)

    def advance(self, nxt: torch.Tensor) -> None:
        self.lengths = self.lengths + 1
        self.next = nxt

    def extend_inputs(
        self, rows: list[int], tokens: list[list[int]], pad_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of a forward pass that appends several tokens to some rows (jump-forward decoding):
        ids [k, L] (right-padded), the 4-D boolean mask [k, 1, L, columns], the column of each token
        [k, L] (also its position), the rows' indices [k] and where each row's last token is [k] (its
        logits give the row's next token: `last_logits`). Padding tokens write past their row's end,
        where nothing reads them and the row's next tokens overwrite them; `extended` then counts the
        real ones."""
        width = max(len(t) for t in tokens)
        lengths = self.lengths[rows]
        columns = lengths[:, None] + torch.arange(width)[None, :]
        end = int(columns.max()) + 1  # columns the pass attends to
        self._reserve(len(self.rows), end, [layer.buffers for layer in self.cache.layers])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.tensor(t)
        mask = torch.arange(end)[None, None, :] <= columns[:, :, None]
        device = self.cache.layers[0].device
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        last = torch.tensor([len(t) - 1 for t in tokens], dtype=torch.long, device=device)
        return ids.to(device), mask[:, None].to(device), columns.to(device), rows_t, last

    def extended(self, rows: list[int], counts: list[int], nxt: torch.Tensor | None = None) -> None:
        """Rows `rows` now hold `counts` more tokens (after a forward pass over `extend_inputs`), and
        `nxt` are their next input tokens."""
        self.lengths[rows] += torch.tensor(counts, dtype=torch.long)
        if nxt is not None:
            self.next[rows] = nxt.cpu()

    def drop_finished(self) -> int:
        """Remove finished or cancelled rows: the last running rows move into the freed slots (one row
        copied per finished one, the other rows untouched). Return how many rows were removed."""
        n = len(self.rows)
        left = sum(not s.finished for s in self.rows)
        if left == n:
            return 0
        holes = [i for i in range(left) if self.rows[i].finished]
        movers = [i for i in range(left, n) if not self.rows[i].finished]
        order = list(range(left))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
            width = int(self.lengths[mover])
            for store in self.stores:
                store[:, hole, :, :width].copy_(store[:, mover, :, :width])
        self.rows = [self.rows[i] for i in order]
        self.lengths, self.next = self.lengths[order], self.next[order]
        return n - left


class FixedBatch:
    """Rows prefilled together that decode together until they all end (caches that cannot be joined)."""

    def __init__(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 for real tokens
        self.next: torch.Tensor | None = None

    def can_merge(self) -> bool:
        return not self.rows

    def add(self, cache: DynamicCache, mask: torch.Tensor, seqs: list[Sequence], nxt: torch.Tensor) -> None:
        if self.rows:
            raise RuntimeError("a FixedBatch takes new rows only when it is empty")
        self.cache, self.mask, self.rows, self.next = cache, mask, list(seqs), nxt

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        return self.next.view(-1, 1), self.mask, self.mask.sum(-1, keepdim=True) - 1

    def advance(self, nxt: torch.Tensor) -> None:
        self.next = nxt

    def drop_finished(self) -> int:
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        dropped = len(self.rows) - len(keep)
        if not keep:
            self.clear()
        elif dropped:
            self.cache.batch_select_indices(torch.tensor(keep, device=self.cache.layers[0].keys.device))
            self.rows = [self.rows[i] for i in keep]
            self.mask, self.next = self.mask[keep], self.next[keep]
        return dropped
