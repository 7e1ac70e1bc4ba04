"""The rows the transformers engine decodes together, and their one shared KV cache.

    batch = RunningBatch()
    ids, mask, pos, cache = prefill_inputs(new_seqs, pad_id, config)   # left-padded prompts
    ... forward, sample first tokens ...
    batch.add(cache, mask, new_seqs, first_tokens)     # join the running rows (continuous batching)
    ids, mask, pos = batch.decode_inputs()             # one token per row
    ... forward, sample ...
    batch.advance(mask, next_tokens); batch.drop_finished()

Rows are left-padded to a common length: the 2-D attention mask hides the padding and each row's
position ids count only its real tokens, so a row's numbers do not depend on its neighbours (greedy
output is the same alone or batched). Joining rows pads the shorter cache on the left and
concatenates along the batch; dropping rows selects the others and trims columns that became padding
for everyone. Only plain `DynamicLayer` caches can be padded this way (`can_merge`).

Each layer is a `GrowingLayer`: its keys and values are views of a buffer with room to spare, so a
decoding step writes one column in place, where transformers' `DynamicLayer` copies the whole cache
into a new tensor (`torch.cat`) every step. Measured on the embedded model (batch 8, CPU): the same
step time on a quiet machine; with a training job on the same cores the copies were 65% of the step.
Prefix caching (`Prefix`) seeds a new batch's cache with a previous prompt's keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from medtune.serve.engines.sequence import Sequence, common_prefix


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
            shared = min(shared, common_prefix(self.ids, s.prompt_ids), len(s.prompt_ids) - 1)
        return shared

    @classmethod
    def of_row(cls, seq: Sequence, cache: DynamicCache, mask: torch.Tensor, row: int) -> Prefix:
        """Row `row`'s prompt as just prefilled (its real columns only, copied out of the batch)."""
        cols = mask[row].nonzero().flatten().to(cache.layers[0].keys.device)
        layers = [(layer.keys[row].index_select(1, cols), layer.values[row].index_select(1, cols))
                  for layer in cache.layers]  # fmt: skip
        return cls(list(seq.prompt_ids), layers)


def prefill_inputs(
    seqs: list[Sequence], pad_id: int, config: Any, prefix: Prefix | None = None, reuse: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """Left-padded prompt ids, attention mask, position ids and a fresh cache for `seqs`.

    With `prefix` and `reuse` > 0, the first `reuse` tokens of every prompt (shared with `prefix`) are
    not computed again: the cache starts with their keys and values, and only the rest of each prompt
    is fed, left-padded after them (the mask hides the padding, positions continue from `reuse`)."""
    rest = [s.prompt_ids[reuse:] for s in seqs]
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
        for layer, (k, v) in zip(cache.layers, prefix.layers, strict=True):
            k, v = (t[:, :reuse].unsqueeze(0).expand(len(seqs), -1, -1, -1) for t in (k, v))
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v  # copied into the layer's buffer at its first update
    return ids, mask, pos, cache


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place: `keys`/`values` are views of the first columns of larger
    buffers. When they are replaced from outside (rows joined, selected or trimmed), the next update
    copies them into fresh buffers once."""

    def __init__(self) -> None:
        super().__init__()
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # what `update` last returned

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.get_seq_length()
        new = used + key_states.shape[-2]
        ours = self._views is not None and self._views[0] is self.keys and self._views[1] is self.values
        if not ours or self._buffers is None or self._buffers[0].shape[-2] < new:
            room = new + max(64, new // 2)
            buffers = []
            for old, fresh in ((self.keys, key_states), (self.values, value_states)):
                buf = fresh.new_empty((*fresh.shape[:-2], room, fresh.shape[-1]))
                if used:
                    buf[..., :used, :] = old
                buffers.append(buf)
            self._buffers = (buffers[0], buffers[1])
        k, v = self._buffers
        k[..., used:new, :] = key_states
        v[..., used:new, :] = value_states
        self.keys, self.values = k[..., :new, :], v[..., :new, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def reset(self) -> None:
        self._buffers = self._views = None
        super().reset()


def plain_layers(cache: DynamicCache) -> bool:
    """True when every layer is a plain full-attention one: such caches can be left-padded, joined along
    the batch and seeded with a cached prefix. Sliding-window or linear-attention layers cannot."""
    return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers)


def new_cache(config: Any) -> DynamicCache:
    """A DynamicCache whose plain layers append in place (sliding-window and other layers stay as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _pad_left(t: torch.Tensor, width: int, dim_from_end: int) -> torch.Tensor:
    missing = width - t.shape[-dim_from_end]
    if missing == 0:
        return t
    return F.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0))


class RunningBatch:
    def __init__(self) -> None:
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 for real tokens
        self.next: torch.Tensor | None = None  # each row's next input token

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.next = [], None, None, None

    def can_merge(self) -> bool:
        """Sliding-window or linear-attention caches cannot be left-padded and concatenated safely:
        such models are batched dynamically (new rows wait until the running ones end)."""
        return self.cache is None or plain_layers(self.cache)

    def add(self, cache: DynamicCache, mask: torch.Tensor, seqs: list[Sequence], nxt: torch.Tensor) -> None:
        """Join freshly prefilled rows (their own cache, mask and next tokens) to the running ones."""
        if not self.rows:
            self.cache, self.mask, self.rows, self.next = cache, mask, list(seqs), nxt
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)], dim=0)
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)], dim=0)
        self.rows = self.rows + list(seqs)
        self.next = torch.cat([self.next, nxt])

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids [rows, 1], the mask grown by one column, and each row's next position."""
        mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        return self.next.view(-1, 1), mask, mask.sum(-1, keepdim=True) - 1

    def advance(self, mask: torch.Tensor, nxt: torch.Tensor) -> None:
        self.mask, self.next = mask, nxt

    def drop_finished(self) -> None:
        """Remove finished or cancelled rows from the batch and the cache."""
        keep = [i for i, s in enumerate(self.rows) if not s.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.cache.layers[0].keys.device))
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[keep]
        self.next = self.next[keep]
        first = int((self.mask.sum(0) > 0).nonzero()[0])  # columns that are padding for every row
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
