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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from medtune.serve.engines.sequence import Sequence


def prefill_inputs(
    seqs: list[Sequence], pad_id: int, config: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """Left-padded prompt ids, attention mask, position ids and a fresh cache for `seqs`."""
    width = max(len(s.prompt_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
        mask[i, width - len(s.prompt_ids) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, DynamicCache(config=config)


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
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

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
