"""The llamacpp engine on a GGUF export of the tiny SFT model: fidelity, batching, constraints, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fixtures_models import tiny_chat_records
from medtune.errors import ConfigError
from medtune.serve.engines.base import Constraint, EngineOptions, GenerationRequest, SamplingParams
from medtune.serve.errors import BadRequest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.gguf

ARIA_SCHEMA = {
    "type": "object",
    "properties": {
        "pathologie": {"type": "string"},
        "confiance": {"type": "string", "enum": ["élevée", "modérée", "faible"]},
        "justification": {"type": "string"},
    },
    "required": ["pathologie", "confiance", "justification"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def sft_gguf(tiny_sft_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medtune.export.gguf import export_gguf

    return export_gguf(tiny_sft_model_dir, tmp_path_factory.mktemp("sft_gguf") / "sft-f16.gguf", "f16").path


@pytest.fixture(scope="module")
def engine(sft_gguf: Path):
    from medtune.serve.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(str(sft_gguf), options=EngineOptions(max_batch_size=4, max_queue=2, threads=2))
    eng.start()
    yield eng
    eng.close()


def _chat(n: int, records_seed: int = 7, **sampling) -> list[GenerationRequest]:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 48)
    return [
        GenerationRequest(messages=r["messages"][:2], sampling=SamplingParams(**sampling))
        for r in tiny_chat_records(n, records_seed)
    ]


def test_greedy_answers_equal_the_hf_model(engine, tiny_sft_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from medtune.data.templates import render_chat
    from medtune.train.models import load_tokenizer

    tok = load_tokenizer(tiny_sft_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_sft_model_dir).eval()
    reqs = _chat(6)
    ours = engine.generate_batch(reqs)
    for req, result in zip(reqs, ours, strict=True):
        ids = tok(render_chat(req.messages, tok, add_generation_prompt=True), add_special_tokens=False,
                  return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id)
        expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert result.text == expected
        assert result.prompt_tokens == ids.shape[1]
    assert any(r.text.strip() for r in ours), "the SFT model answered nothing: the comparison is empty"
    assert engine.reused_prompt_tokens > 0  # answers stayed exact with the shared system prompt reused


def test_batched_equals_one_at_a_time_and_decodes_together(engine):
    reqs = _chat(4, records_seed=11)
    steps = engine.decode_steps
    together = engine.generate_batch(reqs)
    batched_steps = engine.decode_steps - steps
    alone = [engine.generate_batch([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    # Four requests in one llama_decode per step: far fewer steps than one request after another.
    assert batched_steps < sum(r.completion_tokens for r in alone)


def test_a_finished_requests_cache_serves_the_next_prompts_shared_prefix(engine):
    first, second = _chat(2, records_seed=21)  # same system prompt, other measurements
    engine.generate_batch([first])
    before = engine.reused_prompt_tokens
    engine.generate_batch([second])
    a, b = (engine.encode(engine.render(r.messages), add_bos=False) for r in (first, second))
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    assert shared > 20  # the system prompt at least
    assert engine.reused_prompt_tokens - before == min(shared, len(b) - 1)


def test_streamed_text_equals_the_whole_answer(engine):
    req = _chat(1, records_seed=5)[0]

    async def collect() -> list[str]:
        return [d.text async for d in engine.stream(req)]

    pieces = asyncio.run(collect())
    assert "".join(pieces) == engine.generate_batch([req])[0].text


def test_json_schema_is_always_valid_at_the_diagnosis_temperature(engine):
    from jsonschema import validate

    reqs = _chat(12, records_seed=3, temperature=0.1, max_tokens=256, seed=1)
    for r in reqs:
        r.constraint = Constraint("json_schema", ARIA_SCHEMA)
    for result in engine.generate_batch(reqs):
        assert result.finish_reason == "stop"
        validate(json.loads(result.text), ARIA_SCHEMA)
        assert "\\u00e9" not in result.text  # non-ASCII stays UTF-8


def test_bad_requests_are_refused_before_decoding(engine):
    too_long = GenerationRequest(
        prompt="a " * (engine.max_context + 10), sampling=SamplingParams(max_tokens=4)
    )
    with pytest.raises(BadRequest, match="longer than the model's context"):
        engine.generate_batch([too_long])
    greedy = _chat(1, max_tokens=engine.max_context * 2)
    with pytest.raises(BadRequest, match="max_tokens"):
        engine.generate_batch(greedy)
    bad_schema = _chat(1)[0]
    bad_schema.constraint = Constraint("json_schema", {"type": "object", "not": {"required": ["x"]}})
    with pytest.raises(BadRequest, match="'not'"):
        engine.generate_batch([bad_schema])
    assert engine.generate_batch(_chat(1))[0].finish_reason in ("stop", "length")  # still serving


def test_adapters_are_refused_with_a_way_out(sft_gguf):
    from medtune.serve.engines.llamacpp import LlamaCppEngine

    with pytest.raises(ConfigError, match="--fuse"):
        LlamaCppEngine(str(sft_gguf), adapters={"derm": "adapters/derm"})


def test_jump_forward_feeds_forced_tokens_in_the_next_step(sft_gguf, tiny_model_dir, tmp_path):
    """Forced text rides in the row's next llama_decode with its chosen token: the same tokens as decoding
    them one by one (text with one tokenisation only; the untrained model, whose free letters depend on
    every cached token), in fewer steps; the SFT model's schema answers stay valid."""
    from medtune.export.gguf import export_gguf
    from medtune.serve.engines.llamacpp import LlamaCppEngine

    untrained = export_gguf(tiny_model_dir, tmp_path / "untrained-f16.gguf", "f16").path
    one_way = GenerationRequest(prompt="Diagnostic ?", constraint=Constraint("regex", "§¤§ [a-z]{3}§¤§¤§¤[a-z]{3} [a-z]{9}"),
                                sampling=SamplingParams(temperature=0.0, max_tokens=40))  # fmt: skip
    diagnoses = _chat(3, records_seed=3, max_tokens=120)
    for req in diagnoses:
        req.constraint = Constraint("json_schema", ARIA_SCHEMA)
    seen = {}
    for jump in (False, True):
        options = EngineOptions(max_batch_size=4, threads=2, jump_forward=jump)
        for model in (untrained, sft_gguf):
            eng = LlamaCppEngine(str(model), options=options)
            eng.start()
            try:
                if model == untrained:
                    seen[jump] = (
                        eng.generate_batch([one_way])[0].token_ids,
                        eng.decode_steps,
                        eng.forced_tokens,
                    )
                    continue
                for r in eng.generate_batch(diagnoses):
                    assert json.loads(r.text)["confiance"] in ARIA_SCHEMA["properties"]["confiance"]["enum"]
                assert (eng.forced_tokens > 0) == jump
            finally:
                eng.close()
    assert seen[True][0] == seen[False][0]
    assert seen[False][2] == 0 and seen[True][2] >= 10
    assert seen[True][1] < seen[False][1]  # fewer llama_decode calls for the same answer
