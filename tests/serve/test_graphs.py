"""Traced forward passes: the same logits and keys/values as the eager model, at sizes other than the
traced ones; a model whose Python code the tracer would freeze on one path is left eager."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from medtune.serve.engines.graphs import ForwardGraphs
from medtune.serve.engines.kv_batch import Prefix, PromptRow, RaggedBatch, last_logits, prefill_inputs


@pytest.fixture(scope="module", params=["heads", "grouped"])
def model(request, tiny_model_dir, tiny_gqa_model_dir):
    """The tiny model, and one whose two query heads share one key/value head (grouped-query attention:
    the cache and the traced graphs have other shapes)."""
    path = tiny_model_dir if request.param == "heads" else tiny_gqa_model_dir
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def graphs(model):
    with torch.inference_mode():
        built = ForwardGraphs.build(model, pad_id=0)
    assert built is not None
    return built


def _prompts(model, lengths: list[int], shared: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(sum(lengths) + shared)
    start = torch.randint(5, model.config.vocab_size, (shared,), generator=gen).tolist()
    return [start + torch.randint(5, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _prefill(model, graphs, rows: list[PromptRow], prefix: Prefix | None = None, reuse: int = 0):
    """The same prefill eagerly and through the graph: (logits, cache) of each."""
    out = []
    for traced in (False, True):
        ids, mask, pos, cache = prefill_inputs(rows, 0, model.config, prefix, reuse)
        with torch.inference_mode():
            if traced:
                logits = graphs.prefill(ids, mask, pos, cache)
            else:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                               use_cache=True).logits[:, -1]  # fmt: skip
        out.append((logits, cache, mask))
    return out


def _same_step(model, graphs, eager: RaggedBatch, traced: RaggedBatch) -> torch.Tensor:
    """One decoding step of two batches holding the same rows, eagerly and through the graph: the same
    logits (returned)."""
    with torch.inference_mode():
        ids, mask, pos = eager.decode_inputs()
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=eager.cache,
                     use_cache=True).logits[:, -1]  # fmt: skip
        got = graphs.decode(*traced.decode_inputs(), traced)
    assert torch.allclose(got, want, atol=1e-5)
    return want


def test_prefills_match_the_eager_model_with_padding_and_a_reused_prefix(model, graphs):
    rows = [PromptRow(p) for p in _prompts(model, [23, 9, 17], shared=11)]
    (want, want_cache, mask), (got, got_cache, _) = _prefill(model, graphs, rows)
    assert torch.allclose(got, want, atol=1e-5)
    real = mask.bool()  # keys and values of padding columns are never read
    for w, g in zip(want_cache.layers, got_cache.layers, strict=True):
        assert torch.allclose(g.keys.transpose(1, 2)[real], w.keys.transpose(1, 2)[real], atol=1e-5)
        assert torch.allclose(g.values.transpose(1, 2)[real], w.values.transpose(1, 2)[real], atol=1e-5)
    # The shared start reused from the first prompt's cache, as the engine's prefix caching does.
    prefix = Prefix.of_row(rows[0], want_cache, mask, 0)
    reuse = prefix.shared_with(rows[1:])
    assert reuse == 11
    (want, *_), (got, *_) = _prefill(model, graphs, rows[1:], prefix, reuse)
    assert torch.allclose(got, want, atol=1e-5)


def test_decoding_steps_match_the_eager_model_as_rows_join_and_leave(model, graphs):
    rows = [PromptRow(p) for p in _prompts(model, [6, 21, 13, 60, 8])]
    eager, traced = RaggedBatch.for_model(model.config), RaggedBatch.for_model(model.config)

    def join(new: list[PromptRow]) -> None:
        (want, want_cache, mask), (got, got_cache, _) = _prefill(model, graphs, new)
        assert torch.allclose(got, want, atol=1e-5)
        eager.add(want_cache, mask, new, want.argmax(-1))
        traced.add(got_cache, mask, new, want.argmax(-1))

    join(rows[:2])
    columns = []
    for step in range(40):  # long enough for the buffers to grow between two traced steps
        if step == 4:
            join(rows[2:])
        if step == 9:
            rows[1].finished = True
            assert eager.drop_finished() == traced.drop_finished() == 1
        want = _same_step(model, graphs, eager, traced)
        eager.advance(want.argmax(-1))
        traced.advance(want.argmax(-1))
        columns.append(traced.stores[0].shape[3])
    assert len(set(columns)) > 1


def test_tokens_appended_together_match_the_eager_model(model, graphs):
    """Jump-forward decoding's forward pass (several tokens for some rows, right-padded) as a graph: the
    same logits after each row's last token and the same keys and values as eagerly, so the next step
    gives the same logits too."""
    rows = [PromptRow(p) for p in _prompts(model, [6, 21, 13])]
    batches = []
    (want, want_cache, mask), (_, got_cache, _) = _prefill(model, graphs, rows)
    for cache in (want_cache, got_cache):
        batch = RaggedBatch.for_model(model.config)
        batch.add(cache, mask, rows, want.argmax(-1))
        batches.append(batch)
    forced = _prompts(model, [7, 2])
    after = []
    for traced, batch in zip((False, True), batches, strict=True):
        ids, mask4, columns, at, last = batch.extend_inputs([0, 2], forced, pad_id=0)
        with torch.inference_mode():
            if traced:
                after.append(graphs.extend(ids, mask4, columns, at, last, batch))
            else:
                cache = RaggedBatch.cache_over(batch.stores, batch.layout, at, columns, mask4.shape[-1],
                                               several=True)  # fmt: skip
                out = model(
                    input_ids=ids, attention_mask=mask4, position_ids=columns, cache=cache, use_cache=True
                )
                after.append(last_logits(out.logits, last))
        batch.extended([0, 2], [7, 2], after[0].argmax(-1))
    assert torch.allclose(after[1], after[0], atol=1e-5)
    eager, traced = batches
    assert eager.lengths.tolist() == traced.lengths.tolist() == [6 + 7, 21, 13 + 2]
    _same_step(model, graphs, eager, traced)


class Branchy(LlamaForCausalLM):
    """A model whose Python code takes another path for two rows: a trace keeps only one path."""

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if input_ids.shape[0] == 2:
            out.logits = out.logits * 2
        return out


def test_a_model_the_trace_would_get_wrong_stays_eager(tiny_model_dir, caplog):
    branchy = Branchy.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode(), caplog.at_level("INFO"):
        assert ForwardGraphs.build(branchy, pad_id=0) is None
    assert "differs from the eager model" in caplog.text


def test_models_without_sdpa_attention_are_not_traced(tiny_model_dir):
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.inference_mode():
        assert ForwardGraphs.build(eager, pad_id=0) is None
