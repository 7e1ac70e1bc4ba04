"""The serving KV cache: in-place appends that keep DynamicLayer's contents."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from medtune.serve.engines.kv_batch import GrowingLayer, new_cache


def _step(layers, k, v):
    return [layer.update(k, v) for layer in layers]


def test_growing_layer_matches_dynamic_layer_and_appends_in_place():
    torch.manual_seed(0)
    grow, plain = GrowingLayer(), DynamicLayer()
    prompt = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    _step([grow, plain], *prompt)
    start = grow.keys.data_ptr()
    for _ in range(70):  # past the first buffer's spare room (64): it grows once, by copying
        (gk, gv), (pk, pv) = _step([grow, plain], torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
        assert torch.equal(gk, pk) and torch.equal(gv, pv)
    assert grow.get_seq_length() == plain.get_seq_length() == 75
    assert grow.keys.data_ptr() != start  # grew once
    ptr = grow.keys.data_ptr()
    _step([grow, plain], torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    assert grow.keys.data_ptr() == ptr  # and appends in place again


def test_rows_replaced_from_outside_are_taken_over():
    # RunningBatch selects, pads and concatenates `keys`/`values` directly between steps.
    torch.manual_seed(1)
    grow, plain = GrowingLayer(), DynamicLayer()
    _step([grow, plain], torch.randn(4, 2, 6, 4), torch.randn(4, 2, 6, 4))
    for layer in (grow, plain):
        layer.batch_select_indices(torch.tensor([0, 2]))
        layer.keys, layer.values = layer.keys[..., 2:, :], layer.values[..., 2:, :]  # trimmed columns
    (gk, gv), (pk, pv) = _step([grow, plain], torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    assert gk.shape == (2, 2, 5, 4) and torch.equal(gk, pk) and torch.equal(gv, pv)


def test_new_cache_uses_growing_layers(tiny_model_dir):
    from transformers import AutoConfig

    cache = new_cache(AutoConfig.from_pretrained(tiny_model_dir))
    assert cache.layers and all(type(layer) is GrowingLayer for layer in cache.layers)
