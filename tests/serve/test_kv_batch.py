"""The serving KV cache: rows in a RaggedBatch decode exactly as they would alone; joins and departures
copy only the rows that move."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from medtune.serve.engines.kv_batch import (
    FixedBatch,
    PromptRow,
    RaggedBatch,
    last_logits,
    new_cache,
    plain_layers,
    prefill_inputs,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prompts(model, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(sum(lengths))
    vocab = model.config.vocab_size
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]


def _prefill(model, rows: list[PromptRow]):
    ids, mask, pos, cache = prefill_inputs(rows, 0, model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    return cache, mask, out.logits[:, -1].argmax(-1)


def _alone(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Reference: one row in a plain DynamicCache, greedy; the logits of each decoding step."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        nxt, logits = out.logits[:, -1].argmax(-1), []
        for _ in range(steps):
            out = model(input_ids=nxt.view(1, 1), cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            nxt = out.logits[:, -1].argmax(-1)
    return logits


def _step(model, batch: RaggedBatch) -> torch.Tensor:
    ids, mask, pos = batch.decode_inputs()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=batch.cache, use_cache=True)
    logits = out.logits[:, -1]
    batch.advance(logits.argmax(-1))
    return logits


@pytest.mark.parametrize("mask_4d", [False, True], ids=["2-D mask", "4-D SDPA mask"])
def test_rows_joining_and_leaving_decode_as_they_would_alone(model, mask_4d):
    assert RaggedBatch.for_model(model.config).mask_4d  # what the engine uses for this (SDPA) model
    prompts = _prompts(model, [7, 19, 12, 30])
    rows = [PromptRow(p) for p in prompts]
    reference = {id(r): _alone(model, r.prompt_ids, 12) for r in rows}
    seen: dict[int, list[torch.Tensor]] = {id(r): [] for r in rows}
    batch = RaggedBatch(mask_4d=mask_4d)
    cache, mask, first = _prefill(model, rows[:2])  # a left-padded pair
    batch.add(cache, mask, rows[:2], first)
    for step in range(12):
        if step == 3:  # two more join, prefilled together (different lengths: padding between them)
            cache, mask, first = _prefill(model, rows[2:])
            batch.add(cache, mask, rows[2:], first)
        if step == 6:  # the first row leaves: the last row takes its slot
            rows[0].finished = True
            assert batch.drop_finished() == 1
            assert [id(r) for r in batch.rows] == [id(rows[3]), id(rows[1]), id(rows[2])]
        logits = _step(model, batch)
        for row, row_logits in zip(batch.rows, logits, strict=True):
            seen[id(row)].append(row_logits)
    for row in rows:
        got, want = seen[id(row)], reference[id(row)][: len(seen[id(row)])]
        assert len(got) >= 6
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g, w, atol=1e-4), "a row's logits depend on its neighbours"


def test_a_departure_copies_one_row_and_the_buffers_stay(model):
    rows = [PromptRow(p) for p in _prompts(model, [9, 9, 9, 9])]
    cache, mask, first = _prefill(model, rows)
    batch = RaggedBatch()
    batch.add(cache, mask, rows, first)
    _step(model, batch)
    keys = batch.cache.layers[0].buffers[0]
    last_row = [[t[3, :, :10].clone() for t in layer.buffers] for layer in batch.cache.layers]
    rows[1].finished = True
    assert batch.drop_finished() == 1
    assert batch.cache.layers[0].buffers[0].data_ptr() == keys.data_ptr()  # no reallocation
    for layer, before in zip(batch.cache.layers, last_row, strict=True):  # the last row moved into the
        for t, want in zip(layer.buffers, before, strict=True):  # free slot, in every layer
            assert torch.equal(t[1, :, :10], want)
    assert len(batch.stores) == 1  # keys and values of identical layers: one store, one copy per move
    assert batch.lengths.tolist() == [10, 10, 10]
    rows[0].finished = rows[2].finished = rows[3].finished = True
    assert batch.drop_finished() == 3 and len(batch) == 0


def test_buffers_grow_when_a_row_outgrows_them(model):
    rows = [PromptRow(p) for p in _prompts(model, [5, 6])]
    cache, mask, first = _prefill(model, rows)
    batch = RaggedBatch()
    batch.add(cache, mask, rows, first)
    capacity, room = batch.cache.layers[0].buffers[0].shape[0], batch.cache.layers[0].buffers[0].shape[2]
    reference = _alone(model, rows[1].prompt_ids, room + 3)
    for _ in range(room + 3):  # past the first buffers' columns: they are replaced once
        logits = _step(model, batch)
    assert batch.cache.layers[0].buffers[0].shape[2] > room
    assert batch.cache.layers[0].buffers[0].shape[0] == capacity  # only the columns grew
    assert torch.allclose(logits[1], reference[-1], atol=1e-4)


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    """Reference without any cache: the whole sequence in one forward pass."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_tokens_appended_together_decode_as_if_decoded_one_by_one(model):
    """Jump-forward decoding: some rows get several tokens in one forward pass (right-padded to the
    longest, one needing wider buffers); the logits after each row's last token, and the next step's
    logits, are those of the whole sequence."""
    rows = [PromptRow(p) for p in _prompts(model, [7, 19, 12])]
    cache, mask, first = _prefill(model, rows)
    batch = RaggedBatch.for_model(model.config)
    batch.add(cache, mask, rows, first)
    room = batch.stores[0].shape[3]
    forced = {0: _prompts(model, [3])[0], 2: _prompts(model, [room])[0]}  # row 2 outgrows the buffers
    fed = {i: [int(first[i]), *forced[i]] for i in forced}  # the first token is not in the cache yet
    ids, mask4, columns, at, last = batch.extend_inputs(list(fed), list(fed.values()), pad_id=0)
    assert ids.shape == (2, room + 1) and (ids[0, 4:] == 0).all()  # the shorter row is padded
    cache = RaggedBatch.cache_over(batch.stores, batch.layout, at, columns, mask4.shape[-1], several=True)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask4, position_ids=columns, cache=cache, use_cache=True)
    after = last_logits(out.logits, last)
    for k, (i, tokens) in enumerate(fed.items()):
        assert torch.allclose(after[k], _last_logits(model, rows[i].prompt_ids + tokens), atol=1e-4)
    batch.extended(list(fed), [len(t) for t in fed.values()], after.argmax(-1))
    assert batch.lengths.tolist() == [7 + 4, 19, 12 + room + 1] and batch.stores[0].shape[3] > room
    nxt = batch.next.tolist()
    assert nxt[0] == int(after[0].argmax()) and nxt[1] == int(first[1])
    logits = _step(model, batch)
    for i, row in enumerate(rows):
        want = _last_logits(model, row.prompt_ids + fed.get(i, []) + [nxt[i]])
        assert torch.allclose(logits[i], want, atol=1e-4), f"row {i}"


def test_models_with_sliding_window_layers_use_fixed_batches(tiny_sliding_window_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_sliding_window_model_dir).eval()
    assert not plain_layers(new_cache(model.config))
    rows = [PromptRow(p) for p in _prompts(model, [12, 12])]
    batch = FixedBatch()
    cache, mask, first = _prefill(model, rows)
    batch.add(cache, mask, rows, first)
    assert not batch.can_merge()  # new rows wait for the next batch
    with pytest.raises(RuntimeError):
        batch.add(cache, mask, rows, first)
    reference = _alone(model, rows[0].prompt_ids, 10)
    for i in range(10):
        ids, mask, pos = batch.decode_inputs()
        with torch.inference_mode():
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=pos, cache=batch.cache, use_cache=True
            )
        batch.advance(out.logits[:, -1].argmax(-1))
        assert torch.allclose(out.logits[0, -1], reference[i], atol=1e-4)
    rows[1].finished = True
    assert batch.drop_finished() == 1 and len(batch) == 1
    rows[0].finished = True
    assert batch.drop_finished() == 1 and batch.can_merge()


def test_keys_and_values_of_different_shapes_get_their_own_stores():
    """Layers whose values are narrower than their keys (as in MLA attention) still decode ragged."""
    batch = RaggedBatch()
    like = [(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 4)) for _ in range(3)]
    batch._reserve(2, 5, like)
    assert len(batch.stores) == 2
    for layer in batch.cache.layers:
        assert layer.buffers[0].shape[-1] == 8 and layer.buffers[1].shape[-1] == 4
    batch.rows, batch.lengths, batch.next = (
        [PromptRow([1, 2]), PromptRow([3])],
        torch.tensor([2, 1]),
        torch.tensor([5, 6]),
    )
    batch.cache.layers[1].buffers[1][1, :, :1] = 7.0
    batch.rows[0].finished = True
    assert batch.drop_finished() == 1  # row 1 moves into slot 0, values included
    assert torch.equal(batch.cache.layers[1].buffers[1][0, :, :1], torch.full((2, 1, 4), 7.0))
