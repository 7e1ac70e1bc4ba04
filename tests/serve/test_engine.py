"""The transformers engine in-process: batching, per-row settings, stops, constraints, limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os

import pytest
import torch

from medtune.serve.engines import EngineOptions, create_engine
from medtune.serve.engines.base import Constraint, GenerationRequest, SamplingParams
from medtune.serve.errors import BadRequest, ModelNotFound, QueueFull

PROMPTS = [
    "Mesures du coureur : valgus_genou = 12.4",
    "Patiente de 34 ans, maux de tête depuis trois jours, pas de fièvre.",
    "Diagnostic ?",
    "Mesures du coureur : inclinaison_tronc = 8.1, pronation_pied = 2.0, longueur_foulée = 1.2. Diagnostic ?",
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with _started(tiny_model_dir, max_batch_size=8) as eng:
        yield eng


@contextlib.contextmanager
def _started(model_dir, adapters=None, **options):
    """Another engine on `model_dir` (one thread), closed afterwards."""
    eng = create_engine(
        "transformers", str(model_dir), adapters=adapters, options=EngineOptions(threads=1, **options)
    )
    eng.start()
    try:
        yield eng
    finally:
        eng.close()


def _req(prompt: str, max_tokens: int = 24, **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, **sampling))


def _staggered(engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    async def run() -> list[list[int]]:
        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.004 * i)
            return (await engine.generate(reqs[i])).token_ids

        return list(await asyncio.gather(*(one(i) for i in range(len(reqs)))))

    return asyncio.run(run())


def test_greedy_output_is_the_same_alone_and_batched(engine):
    reqs = [_req(p, max_tokens=16 + 4 * i) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate_batch([r])[0] for r in reqs]
    together = engine.generate_batch(reqs)
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.completion_tokens == len(a.token_ids)


def test_a_shared_prompt_start_is_prefilled_once_with_the_same_output(engine, tiny_model_dir):
    system = "Tu es ARIA, assistant de diagnostic biomécanique de la course. Réponds en JSON.\n"
    reqs = [_req(system + p, max_tokens=12) for p in PROMPTS]
    before = engine.reused_prompt_tokens
    alone = [engine.generate_batch([r])[0].token_ids for r in reqs]
    together = [r.token_ids for r in engine.generate_batch(reqs)]
    shared = len(engine.encode(system, add_special_tokens=True)) - 2  # the last piece may merge
    assert engine.reused_prompt_tokens - before >= 7 * shared  # every prompt after the first
    with _started(tiny_model_dir, prefix_caching=False) as plain:
        fresh = [plain.generate_batch([r])[0].token_ids for r in reqs]
        assert plain.reused_prompt_tokens == 0
    assert alone == fresh and together == fresh


def test_requests_joining_a_running_batch_get_the_same_output(engine):
    """Continuous batching: later requests join while earlier ones decode (different cache lengths)."""
    reqs = [_req(p, max_tokens=40 - 5 * i) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate_batch([r])[0].token_ids for r in reqs]
    assert _staggered(engine, reqs) == alone


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the prefill thread needs two cores")
def test_prefills_overlap_decoding_or_not_with_the_same_output(engine, tiny_model_dir):
    """On two cores new requests are prefilled on a second thread while the batch decodes; without it
    the decoding thread prefills between two steps. Same tokens either way."""
    assert engine._prefill_thread is not None and engine._prefill_thread.is_alive()
    reqs = [_req(p, max_tokens=30 - 4 * i) for i, p in enumerate(PROMPTS * 2)]
    overlapped = _staggered(engine, reqs)
    with _started(tiny_model_dir, overlap_prefill=False) as serial:
        assert serial._prefill_thread is None
        assert _staggered(serial, reqs) == overlapped
    assert overlapped == [engine.generate_batch([r])[0].token_ids for r in reqs]


def test_traced_and_eager_forward_passes_give_the_same_output(engine, tiny_model_dir):
    """The engine runs the tiny model through traced graphs (graphs.py); `enforce_eager` turns them
    off. Same tokens either way, for requests sharing a prompt start and joining a running batch."""
    assert engine._graphs is not None
    system = "Tu es ARIA, assistant de diagnostic biomécanique de la course. Réponds en JSON.\n"
    reqs = [_req(system + p, max_tokens=30 - 3 * i) for i, p in enumerate(PROMPTS)]
    traced = _staggered(engine, reqs)
    with _started(tiny_model_dir, enforce_eager=True) as eager:
        assert eager._graphs is None
        assert _staggered(eager, reqs) == traced


def test_a_grouped_query_model_batches_as_it_decodes_alone(tiny_gqa_model_dir):
    """Query heads sharing key/value heads (`model.embedded.num_kv_heads`): one cached head per row
    instead of two here, and the same tokens alone, batched, traced or eager."""
    path = tiny_gqa_model_dir
    reqs = [_req(p, max_tokens=30 - 3 * i) for i, p in enumerate(PROMPTS * 2)]
    with _started(path, max_batch_size=8) as eng:
        assert eng._graphs is not None
        alone = [eng.generate_batch([r])[0].token_ids for r in reqs]
        assert all(alone)
        assert _staggered(eng, reqs) == alone
        assert [store.shape[2] for store in eng._batch.stores] == [1]  # [tensors, rows, heads, ...]
    with _started(path, enforce_eager=True) as eager:
        assert _staggered(eager, reqs) == alone


def test_no_prefill_thread_when_the_model_already_uses_every_core(tiny_model_dir):
    cores = len(os.sched_getaffinity(0))
    eng = create_engine("transformers", str(tiny_model_dir), options=EngineOptions(threads=cores))
    eng.start()
    try:
        assert eng._prefill_thread is None  # two threads of `cores` threads each would oversubscribe
        assert eng.generate_batch([_req(PROMPTS[0], max_tokens=4)])[0].completion_tokens == 4
    finally:
        eng.close()


def test_a_sliding_window_model_is_batched_dynamically(tiny_sliding_window_model_dir):
    """Sliding-window caches cannot take rows mid-way: a batch runs to its end, then the next one starts."""
    eng = create_engine("transformers", str(tiny_sliding_window_model_dir), options=EngineOptions(threads=1))
    eng.start()
    try:
        assert eng._prefill_thread is None and not eng._prefix_ok
        reqs = [_req(p, max_tokens=20) for p in PROMPTS]
        alone = [eng.generate_batch([r])[0].token_ids for r in reqs]
        assert _staggered(eng, reqs) == alone
        assert [r.token_ids for r in eng.generate_batch(reqs)] == alone
    finally:
        eng.close()


def test_each_row_keeps_its_own_sampling_settings(engine):
    greedy = _req(PROMPTS[0], max_tokens=20)
    seeded = _req(PROMPTS[1], max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    penalised = _req(PROMPTS[2], max_tokens=20, frequency_penalty=2.0)
    alone = [engine.generate_batch([r])[0].token_ids for r in (greedy, seeded, penalised)]
    together = [r.token_ids for r in engine.generate_batch([greedy, seeded, penalised])]
    assert together == alone
    # The penalty changed the answer: a repeated token costs more.
    plain = engine.generate_batch([_req(PROMPTS[2], max_tokens=20)])[0].token_ids
    assert plain != alone[2]
    assert len(set(alone[2])) >= len(set(plain))


def test_stop_strings_end_the_answer_and_are_never_streamed(engine):
    full = engine.generate_batch([_req(PROMPTS[3], max_tokens=40)])[0].text
    assert len(full) > 12
    stop = full[8:11]

    async def stream() -> list:
        return [d async for d in engine.stream(_req(PROMPTS[3], max_tokens=40, stop=[stop]))]

    deltas = asyncio.run(stream())
    text = "".join(d.text for d in deltas)
    assert text == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_constrained_json_uses_plain_utf8_and_length_when_cut(engine):
    schema = {
        "type": "object",
        "properties": {"confiance": {"enum": ["élevée", "modérée", "faible"]}, "score": {"type": "integer"}},
        "required": ["confiance", "score"],
    }
    constraint = Constraint("json_schema", schema)
    reqs = [GenerationRequest(prompt=p, sampling=SamplingParams(temperature=0.0, max_tokens=60), constraint=constraint)
            for p in PROMPTS]  # fmt: skip
    for r in engine.generate_batch(reqs):
        if r.finish_reason == "stop":
            value = json.loads(r.text)
            assert value["confiance"] in schema["properties"]["confiance"]["enum"]
            assert "\\u" not in r.text
        else:
            assert r.completion_tokens == 60
    cut = engine.generate_batch([GenerationRequest(prompt=PROMPTS[0], constraint=constraint,
                                                   sampling=SamplingParams(temperature=0.0, max_tokens=3))])[0]  # fmt: skip
    assert cut.finish_reason == "length" and cut.completion_tokens == 3


def test_a_choice_constraint_finishes_as_soon_as_the_answer_is_complete(engine):
    req = GenerationRequest(prompt=PROMPTS[1], sampling=SamplingParams(temperature=0.0, max_tokens=50),
                            constraint=Constraint("choice", ["oui", "non"]))  # fmt: skip
    r = engine.generate_batch([req])[0]
    assert r.text in ("oui", "non") and r.finish_reason == "stop"


def test_lengths_are_checked_before_queueing(engine):
    too_long = "valgus " * 3000
    with pytest.raises(BadRequest) as err:
        engine.generate_batch([_req(too_long)])
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"
    with pytest.raises(BadRequest) as err:
        engine.generate_batch([_req(PROMPTS[0], max_tokens=engine.max_context)])
    assert err.value.param == "max_tokens"
    with pytest.raises(ModelNotFound):
        engine.generate_batch([GenerationRequest(prompt="x", adapter="nope")])


def test_the_waiting_queue_is_bounded(tiny_model_dir):
    eng = create_engine("transformers", str(tiny_model_dir),
                        options=EngineOptions(max_batch_size=1, max_queue=1, threads=1))  # fmt: skip
    eng.start()
    try:

        async def run() -> list:
            streams = [eng.stream(_req(PROMPTS[0], max_tokens=200)) for _ in range(4)]
            firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
            for s in streams:
                await s.aclose()
            return firsts

        firsts = asyncio.run(run())
        refused = [f for f in firsts if isinstance(f, QueueFull)]
        assert len(refused) >= 2 and refused[0].status == 429
        assert eng.generate_batch([_req(PROMPTS[0], max_tokens=2)])[0].completion_tokens == 2
    finally:
        eng.close()


def test_closing_a_stream_frees_its_batch_slot(engine):
    async def run() -> None:
        stream = engine.stream(_req(PROMPTS[0], max_tokens=500))
        await anext(stream)
        await stream.aclose()
        for _ in range(200):
            if engine.running == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert engine.running == 0 and engine.queue_depth == 0


def test_prompts_are_logged_only_when_asked(tiny_model_dir, caplog):
    eng = create_engine(
        "transformers", str(tiny_model_dir), options=EngineOptions(log_prompts=True, threads=1)
    )
    eng.start()
    try:
        with caplog.at_level("INFO", logger="medtune.serve.engines.transformers"):
            eng.generate_batch([_req("Patient Dupont, dossier 4711", max_tokens=2)])
    finally:
        eng.close()
    assert "Dupont" in caplog.text


def test_greedy_output_matches_transformers_generate(engine, tiny_model_dir):
    """The engine's own cache and batching change nothing: same tokens as `model.generate`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reqs = [_req(p, max_tokens=30) for p in PROMPTS]
    ours = engine.generate_batch(reqs)
    for prompt, result in zip(PROMPTS, ours, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=30, do_sample=False, eos_token_id=tokenizer.eos_token_id
            )
        expected = out[0, ids["input_ids"].shape[1] :].tolist()
        assert result.token_ids == expected[: len(result.token_ids)]
        assert len(result.token_ids) == len(expected)


@pytest.mark.parametrize("top_p", [1.0, 0.75])
def test_sampling_follows_the_temperature_scaled_distribution(tiny_model_dir, top_p):
    import torch
    from transformers import AutoTokenizer

    from medtune.serve.engines.sequence import Sequence, choose_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs)
    rows = 3000
    seqs = [Sequence(GenerationRequest(prompt="x", sampling=SamplingParams(temperature=0.5, top_p=top_p, seed=i)),
                     [1], 10, None, tokenizer, set(), None) for i in range(rows)]  # fmt: skip
    chosen = [t for t, _ in choose_tokens(logits.repeat(rows, 1), seqs, None, None, tokenizer)]
    expected = torch.softmax(logits / 0.5, dim=-1)  # [0.66, 0.24, 0.06, 0.005]
    if top_p < 1.0:  # the nucleus: the smallest top set reaching 75% -> the first two tokens, renormalised
        expected = torch.tensor([expected[0], expected[1], 0, 0]) / (expected[0] + expected[1])
    observed = torch.bincount(torch.tensor(chosen), minlength=len(probs)).float() / rows
    assert torch.allclose(observed, expected, atol=0.03), (observed, expected)
    again = [t for t, _ in choose_tokens(logits.repeat(rows, 1), [
        Sequence(GenerationRequest(prompt="x", sampling=SamplingParams(temperature=0.5, top_p=top_p, seed=i)),
                 [1], 10, None, tokenizer, set(), None) for i in range(rows)], None, None, tokenizer)]  # fmt: skip
    assert again == chosen  # seeded: the same draws again


def test_an_adapter_replaced_under_its_name_does_not_reuse_the_old_prefix(served_model_dir, lora_adapters):
    """The prefix cache is per adapter: a name unloaded and loaded again from other weights starts afresh."""
    question = [{"role": "system", "content": "Tu es un assistant médical. Réponds en une phrase."},
                {"role": "user", "content": "Bonjour"}]  # fmt: skip
    req = GenerationRequest(
        messages=question, sampling=SamplingParams(temperature=0.0, max_tokens=12), adapter="spec"
    )
    with _started(served_model_dir, adapters={"spec": str(lora_adapters["derm"])}) as engine:
        assert engine.generate_batch([req])[0].text.startswith("Avis dermatologique")
        assert "spec" in engine._prefixes
        engine.unload_adapter("spec")
        assert "spec" not in engine._prefixes
        engine.load_adapter("spec", str(lora_adapters["radio"]))
        before = engine.reused_prompt_tokens
        assert engine.generate_batch([req])[0].text.startswith("Avis radiologique")
        assert engine.reused_prompt_tokens == before  # computed in full with the new weights
        assert engine.generate_batch([req])[0].text.startswith("Avis radiologique")
        assert engine.reused_prompt_tokens > before  # and reused from then on


def test_base_requests_give_the_same_output_with_and_after_adapters(served_model_dir, lora_adapters):
    """The traced graphs are the base model's: used again once the last adapter is unloaded (while
    adapters are loaded, rows go through PEFT eagerly), with the same output as the plain engine."""
    question = [{"role": "user", "content": "Bonjour"}]
    req = GenerationRequest(messages=question, sampling=SamplingParams(temperature=0.0, max_tokens=12))
    with _started(served_model_dir) as plain:
        want = plain.generate_batch([req])[0].token_ids
    with _started(served_model_dir, adapters={"spec": str(lora_adapters["derm"])}) as engine:
        assert engine._graphs is not None
        assert engine.generate_batch([req])[0].token_ids == want  # base rows, eager beside the adapter
        engine.unload_adapter("spec")
        assert engine.generate_batch([req])[0].token_ids == want  # through the graphs again


ARIA_SCHEMA = {
    "type": "object",
    "properties": {
        "pathologie": {"enum": ["Syndrome fémoro-patellaire (SFP)", "Syndrome bandelette ilio-tibiale (SBIT)",
                                "Périostite tibiale", "Fasciite plantaire"]},
        "confiance": {"enum": ["élevée", "modérée", "faible"]},
        "justification": {"type": "string", "maxLength": 40},
    },
    "required": ["pathologie", "confiance", "justification"],
    "additionalProperties": False,
}  # fmt: skip


def _diagnoses(n: int, **sampling) -> list[GenerationRequest]:
    sampling.setdefault("temperature", 0.0)
    return [
        GenerationRequest(messages=[{"role": "user", "content": p}], constraint=Constraint("json_schema", ARIA_SCHEMA),
                          sampling=SamplingParams(max_tokens=120, **sampling))
        for p in (PROMPTS * 3)[:n]
    ]  # fmt: skip


def test_jump_forward_feeds_the_tokens_the_grammar_forces(tiny_sft_model_dir):
    """Keys and the rest of an enum value once its first token decided it are not decoded one by one:
    they are the canonical tokens of the forced text (the opening brace and first key fed with the
    prompt), and valid answers come out the same alone and batched. (Whether they equal the answers
    decoded token by token depends on the model writing the tokenizer's own split: a trained model does,
    this 16-step one not always; `test_jump_forward_gives_every_path_the_same_tokens` checks equality on
    text that has one split only.)"""
    reqs = _diagnoses(6)
    with _started(tiny_sft_model_dir, max_batch_size=4) as engine:
        alone = [engine.generate_batch([r])[0] for r in reqs]
        per_request = engine.forced_tokens / len(reqs)
        staggered = _staggered(engine, reqs)
        tokenizer = engine.tokenizer
    opening = tokenizer('{"pathologie": "', add_special_tokens=False)["input_ids"][:-1]
    for r in alone:
        value = json.loads(r.text)
        assert value["confiance"] in ARIA_SCHEMA["properties"]["confiance"]["enum"]
        assert r.token_ids[: len(opening)] == opening
    assert per_request >= 6  # at least the first key's and the two later keys' tokens
    assert staggered == [r.token_ids for r in alone]


def test_no_jump_forward_for_requests_that_want_logprobs(engine):
    req = _diagnoses(1, logprobs=True)[0]
    before = engine.forced_tokens
    r = engine.generate_batch([req])[0]
    assert engine.forced_tokens == before
    assert len(r.logprobs) == r.completion_tokens  # every token decoded, each with its log-probability


def test_no_jump_forward_for_requests_with_a_logit_bias(engine):
    """A forced token is not chosen from logits, so a bias could not act on it: such requests decode every
    token (the bias still cannot break the schema)."""
    req = _diagnoses(1, logit_bias={engine.tokenizer.convert_tokens_to_ids("<0x61>"): 5.0})[0]
    before = engine.forced_tokens
    r = engine.generate_batch([req])[0]
    assert engine.forced_tokens == before
    json.loads(r.text)


def test_penalties_count_the_tokens_forced_before_the_prefill(engine):
    """A frequency penalty sees the forced opening tokens too (they are part of the answer)."""
    req = _diagnoses(1, frequency_penalty=2.0, presence_penalty=1.0)[0]
    before = engine.forced_tokens
    r = engine.generate_batch([req])[0]
    assert engine.forced_tokens > before
    json.loads(r.text)  # still a valid answer


# Text with one tokenisation only (byte tokens, no merge covers them): the forced tokens are the ones
# any model must write, so output is the same with and without jump-forward, and the free letters after
# them depend on their keys and values.
ONE_WAY = Constraint("regex", "§¤§ [a-z]{3}§¤§¤§¤[a-z]{3}§¤§¤ [a-z]{16}")


def _random_adapter(model_dir, out):
    """A LoRA adapter with random weights on every linear layer (its rows decode differently)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(out)
    return str(out)


def test_jump_forward_gives_every_path_the_same_tokens(tiny_model_dir, tmp_path):
    """Forced tokens go through the traced graph, eagerly (`enforce_eager`), and through PEFT while an
    adapter is loaded (each row with its own adapter): the same tokens as decoding them one by one."""
    sampling = SamplingParams(temperature=0.0, max_tokens=40)
    req = GenerationRequest(prompt=PROMPTS[0], constraint=ONE_WAY, sampling=sampling)
    rnd = GenerationRequest(prompt=PROMPTS[1], constraint=ONE_WAY, sampling=sampling, adapter="rnd")
    adapters = {"rnd": _random_adapter(tiny_model_dir, tmp_path / "rnd")}
    with _started(tiny_model_dir, adapters=adapters, jump_forward=False) as plain:
        want = [r.token_ids for r in plain.generate_batch([req, rnd])]
        assert plain.forced_tokens == 0
    for options in ({}, {"enforce_eager": True}):
        with _started(tiny_model_dir, **options) as engine:
            assert engine.generate_batch([req])[0].token_ids == want[0]
            assert engine.forced_tokens >= 15
    with _started(tiny_model_dir, adapters=adapters) as engine:
        assert [r.token_ids for r in engine.generate_batch([req, rnd])] == want
        assert engine.forced_tokens >= 30


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_grammar_mask_is_computed_only_when_the_pick_breaks_the_grammar(tiny_model_dir, temperature):
    """A constrained row first picks without the mask; only when the grammar refuses that pick is the mask
    filled and the row picks again, with the same noise: the same token as masking first, always."""
    from transformers import AutoTokenizer

    from medtune.serve.engines.sequence import Sequence, choose_tokens
    from medtune.serve.guided import Guide

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    guide = Guide(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])
    constraint = Constraint("choice", ["oui", "non"])
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("oui", "non"))  # allowed
    fills = []
    fill_rows = guide.fill_rows
    guide.fill_rows = lambda bitmask, matchers: (fills.append(len(matchers)), fill_rows(bitmask, matchers))

    def choose(logits: torch.Tensor, seed: int, masked_first: bool) -> int:
        req = GenerationRequest(prompt="x", sampling=SamplingParams(temperature=temperature, seed=seed))
        seq = Sequence(req, [1], 10, guide.matcher(constraint), tokenizer, set(), None)
        logits = logits.clone()[None]
        bitmask = guide.allocate(1)
        if masked_first:  # the reference: mask, then pick
            fill_rows(bitmask, [(0, seq.matcher)])
            guide.apply(logits, bitmask, [0])
        return choose_tokens(logits, [seq], guide, bitmask, tokenizer)[0][0]

    gen = torch.Generator().manual_seed(0)
    for seed in range(40):
        logits = torch.randn(len(tokenizer), generator=gen)
        logits[yes] += 3.0 if seed % 2 else -3.0  # allowed; the best token on odd seeds only
        logits[no] -= 1.0
        before = len(fills)
        want = choose(logits, seed, masked_first=True)
        fills[before:] = []
        got = choose(logits, seed, masked_first=False)
        assert got == want and guide.allows(guide.matcher(constraint), got)
        if temperature == 0.0:  # masked only when the best token is not allowed
            assert (len(fills) > before) == (
                not guide.allows(guide.matcher(constraint), int(logits.argmax()))
            )
    assert 0 < len(fills) < 40  # some picks were refused, not all
