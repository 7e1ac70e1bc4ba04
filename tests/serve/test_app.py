"""The OpenAI-compatible server end to end: a real `medtune serve` subprocess and the `openai` client."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from medtune.tasks import get_task

ARIA = get_task("aria")


def _metric(server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers(), timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            got = series[len(name) :].strip("{}")
            if ",".join(sorted(got.split(","))) == want:
                return float(value)
    return 0.0


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_lists_base_and_adapters_with_parent(live_server):
    models = {m.id: m for m in live_server.client().models.list().data}
    assert set(models) == {"aria-ft", "derm", "radio"}
    assert models["derm"].parent == "aria-ft" and models["radio"].parent == "aria-ft"
    assert models["aria-ft"].parent is None


def test_health_is_open_and_everything_else_needs_the_key(live_server):
    health = httpx.get(f"{live_server.base_url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["loaded"] is True
    for path in ("/v1/models", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(f"{live_server.base_url}{path}", headers=headers, timeout=10)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
    bad = live_server.client(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="aria-ft", messages=_user("Bonjour"), max_tokens=2)


def test_chat_completion_reports_usage_and_finish_reason(live_server):
    r = live_server.client().chat.completions.create(
        model="aria-ft", messages=_user("Mesures du coureur : valgus_genou = 12.1. Diagnostic ?"), max_tokens=6,
        temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 10


def test_streamed_text_equals_the_plain_answer_at_temperature_zero(live_server):
    client = live_server.client()
    kwargs = dict(model="aria-ft", messages=_user("Mesures du coureur : pronation_pied = 7.5. Diagnostic ?"),
                  temperature=0, max_tokens=60)  # fmt: skip
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # The wire format ends with the [DONE] sentinel.
    raw = httpx.post(f"{live_server.base_url}/v1/chat/completions", headers=live_server.headers(),
                     json={**kwargs, "stream": True}, timeout=60)  # fmt: skip
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")
    # A constrained answer too: jump-forward decoding streams the forced JSON with the sampled tokens.
    kwargs = dict(kwargs, max_tokens=ARIA.max_tokens, response_format=ARIA.response_format())
    plain = client.chat.completions.create(**kwargs)
    streamed = client.chat.completions.create(**kwargs, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == plain.choices[0].message.content
    )
    assert plain.choices[0].message.content.startswith('{"')


def test_200_diagnoses_with_random_measurements_all_validate(live_server):
    """The production ARIA call: every answer is complete JSON valid against the schema, compact,
    with non-ASCII enum values as plain UTF-8."""
    schema = ARIA.response_format()["json_schema"]["schema"]
    records = ARIA.generate_inputs(200, seed=11)
    client = live_server.async_client()
    gate = asyncio.Semaphore(16)

    async def diagnose(i: int, record: dict) -> openai.types.chat.ChatCompletion:
        async with gate:
            return await client.chat.completions.create(
                model="aria-ft", messages=ARIA.messages(record), temperature=ARIA.temperature,
                max_tokens=ARIA.max_tokens, seed=i, response_format=ARIA.response_format(),
            )  # fmt: skip

    async def run() -> list:
        async with client:
            return await asyncio.gather(*(diagnose(i, r) for i, r in enumerate(records)))

    answers = asyncio.run(run())
    confidences = set()
    for r in answers:
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", text
        parsed = json.loads(text)
        jsonschema.validate(parsed, schema)
        assert text == json.dumps(parsed, ensure_ascii=False)  # compact, no whitespace runaway, no \u escapes
        confidences.add(parsed["confiance"])
    assert confidences & {"élevée", "modérée"}  # non-ASCII values did come out (as UTF-8, checked above)


def test_max_tokens_cutting_the_json_reports_length(live_server):
    record = ARIA.generate_inputs(1, seed=3)[0]
    r = live_server.client().chat.completions.create(
        model="aria-ft", messages=ARIA.messages(record), max_tokens=4, temperature=0,
        response_format=ARIA.response_format(),
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_guided_choice_regex_and_json_object(live_server):
    client = live_server.client()
    messages = _user("Mesures du coureur : inclinaison_tronc = 9. Diagnostic ?")
    choice = client.chat.completions.create(model="aria-ft", messages=messages, max_tokens=20,
                                            extra_body={"guided_choice": ["oui", "non", "peut-être"]})  # fmt: skip
    assert choice.choices[0].message.content in ("oui", "non", "peut-être")
    regex = client.chat.completions.create(model="aria-ft", messages=messages, max_tokens=20,
                                           extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})  # fmt: skip
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].message.content)
    obj = client.chat.completions.create(model="aria-ft", messages=messages, max_tokens=120, temperature=0,
                                         response_format={"type": "json_object"})  # fmt: skip
    text = obj.choices[0].message.content
    assert text.startswith('{"')
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_two_adapters_answer_with_their_own_output_in_concurrent_requests(live_server):
    question = "Mesures du coureur : adduction_hanche = 11.2. Diagnostic ?"

    async def ask_all(models: list[str]) -> list[str]:
        async with live_server.async_client() as client:

            async def ask(model: str) -> str:
                r = await client.chat.completions.create(model=model, messages=_user(question), max_tokens=24,
                                                         temperature=0)  # fmt: skip
                return r.choices[0].message.content

            return await asyncio.gather(*(ask(m) for m in models))

    alone = {m: asyncio.run(ask_all([m]))[0] for m in ("derm", "radio", "aria-ft")}
    assert alone["derm"].startswith("Avis dermatologique")
    assert alone["radio"].startswith("Avis radiologique")
    assert not alone["aria-ft"].startswith("Avis")
    models = ["derm", "radio", "aria-ft"] * 4
    for model, answer in zip(models, asyncio.run(ask_all(models)), strict=True):
        assert answer == alone[model], model


def test_adapters_load_and_unload_at_run_time(live_server, lora_adapters):
    url, headers = live_server.base_url, live_server.headers()
    body = {"name": "derm2", "path": str(lora_adapters["derm"])}
    assert httpx.post(f"{url}/v1/adapters", json=body, timeout=30).status_code == 401
    loaded = httpx.post(f"{url}/v1/adapters", json=body, headers=headers, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["parent"] == "aria-ft"
    client = live_server.client()
    assert "derm2" in {m.id for m in client.models.list().data}
    r = client.chat.completions.create(model="derm2", messages=_user("Bonjour"), max_tokens=12, temperature=0)
    assert r.choices[0].message.content.startswith("Avis dermatologique")
    assert httpx.delete(f"{url}/v1/adapters/derm2", headers=headers, timeout=30).status_code == 200
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="derm2", messages=_user("Bonjour"), max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    assert httpx.delete(f"{url}/v1/adapters/derm2", headers=headers, timeout=30).status_code == 404
    not_adapter = httpx.post(
        f"{url}/v1/adapters", json={"name": "x", "path": "/nonexistent"}, headers=headers
    )
    assert not_adapter.status_code == 400 and "adapter_config.json" in not_adapter.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"model": "nope"}, "model", ["nope", "aria-ft"]),
        ({"max_tokens": 5000}, "max_tokens", ["max_tokens", "context"]),
        ({"temperature": 3.5}, "temperature", ["temperature"]),
        ({"top_p": 0}, "top_p", ["top_p"]),
        ({"n": 50}, "n", ["n"]),
        ({"messages": []}, "messages", ["messages"]),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", ["role"]),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": {
            "type": "object", "properties": {"a": {"type": "strin"}}}}}}, None, ["properties.a.type"]),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": {
            "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}}, None, ["'not'"]),
        ({"extra_body_regex": True}, "guided_regex", ["Lookbehind"]),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": {
            "type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}}}, None,
         ["'$ref'", "example.com"]),
        ({"seed": 2**70}, "seed", ["seed"]),
        ({"logit_bias": {"99999": 5}}, "logit_bias", ["99999", "vocabulary"]),
        ({"logit_bias": {"a": 5}}, "logit_bias", ["token ids"]),
        ({"logit_bias": {"²": 5}}, "logit_bias", ["token ids"]),  # a digit to str.isdigit, not to int()
        ({"logit_bias": {"5": 150}}, "logit_bias", ["-100 and 100"]),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["function calling", "none"]),
    ],
)  # fmt: skip
def test_bad_requests_get_a_400_naming_the_problem(live_server, extra, param, words):
    body = {"model": "aria-ft", "messages": _user("Bonjour"), "max_tokens": 4}
    extra = dict(extra)  # the parameters are shared with test_app_llamacpp.py: never mutate them
    if extra.pop("extra_body_regex", False):
        extra = {"guided_regex": "(?<=a)b"}
    body.update(extra)
    r = httpx.post(f"{live_server.base_url}/v1/chat/completions", json=body, headers=live_server.headers(),
                   timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] and error["param"].startswith(param)
    for word in words:
        assert word in error["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        # The second comma, counted from 0 as Python's json module counts.
        (b'{"model": "aria-ft",, "n": 1}', "application/json", ["not valid JSON", "character 20"]),
        (b'{"model": "aria-ft", "messages": [{"role": "user", "content": "\xff"}]}', "application/json", ["UTF-8"]),
        (b'{"model": "aria-ft", "messages": [{"role": "user", "content": "a\\ud83d"}]}', "application/json",
         ["messages[0].content", "surrogate"]),
        (b'{"model": "aria-ft", "messages": [{"role": "user", "content": "a"}]}', "application/x-www-form-urlencoded",
         ["Content-Type: application/json", "x-www-form-urlencoded"]),
    ],
    ids=["not JSON", "not UTF-8", "lone surrogate", "form content type"],
)  # fmt: skip
def test_an_unreadable_body_is_a_400_saying_why(live_server, body, content_type, words):
    r = httpx.post(f"{live_server.base_url}/v1/chat/completions", content=body,
                   headers={**live_server.headers(), "content-type": content_type}, timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    for word in words:
        assert word in message
    assert live_server.client().models.list().data  # still serving


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"prompt": [1, 2, 3]}, "prompt"), ({"suffix": "fin"}, "suffix"), ({"best_of": 3}, "best_of")],
)
def test_text_completion_options_it_cannot_honour_are_a_400(live_server, extra, param):
    body = {"model": "aria-ft", "prompt": "Bonjour", "max_tokens": 4, **extra}
    r = httpx.post(
        f"{live_server.base_url}/v1/completions", json=body, headers=live_server.headers(), timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_prompt_longer_than_the_context_is_a_400(live_server):
    with pytest.raises(openai.BadRequestError) as err:
        live_server.client().chat.completions.create(
            model="aria-ft", messages=_user("valgus genou " * 2000), max_tokens=4
        )
    assert err.value.body["code"] == "context_length_exceeded"


def test_oversized_body_is_a_413_and_the_server_keeps_serving(live_server):
    huge = {"model": "aria-ft", "messages": _user("x" * (2 << 20)), "max_tokens": 2}
    r = httpx.post(f"{live_server.base_url}/v1/chat/completions", json=huge, headers=live_server.headers(),
                   timeout=60)  # fmt: skip
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    ok = live_server.client().chat.completions.create(
        model="aria-ft", messages=_user("Bonjour"), max_tokens=2
    )
    assert ok.choices[0].message.content is not None


def test_metrics_count_requests_by_status(live_server):
    before_400 = _metric(live_server, "medtune_requests_total", route="/v1/chat/completions", status="400")
    before_401 = _metric(live_server, "medtune_requests_total", route="/v1/models", status="401")
    before_200 = _metric(live_server, "medtune_requests_total", route="/v1/chat/completions", status="200")
    client = live_server.client()
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="nope", messages=_user("x"), max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        live_server.client(api_key="wrong").models.list()
    client.chat.completions.create(model="aria-ft", messages=_user("x"), max_tokens=2)
    assert (
        _metric(live_server, "medtune_requests_total", route="/v1/chat/completions", status="400")
        == before_400 + 2
    )
    assert _metric(live_server, "medtune_requests_total", route="/v1/models", status="401") == before_401 + 1
    assert (
        _metric(live_server, "medtune_requests_total", route="/v1/chat/completions", status="200")
        == before_200 + 1
    )
    text = httpx.get(f"{live_server.base_url}/metrics", headers=live_server.headers(), timeout=10).text
    for name in ("process_resident_memory_bytes", "medtune_time_to_first_token_seconds_count",
                 "medtune_request_duration_seconds_bucket", "medtune_completion_tokens_total",
                 "medtune_queue_depth", "medtune_running_requests"):  # fmt: skip
        assert name in text


def test_metrics_count_cached_prompt_tokens_and_forced_tokens(live_server):
    """Two diagnoses share the system prompt (its cache is reused) and their JSON keys are forced."""
    cached = _metric(live_server, "medtune_prompt_tokens_cached_total")
    forced = _metric(live_server, "medtune_forced_tokens_total")
    client = live_server.client()
    for record in ARIA.generate_inputs(2, seed=4):
        client.chat.completions.create(model="aria-ft", messages=ARIA.messages(record), temperature=0,
                                       max_tokens=ARIA.max_tokens, response_format=ARIA.response_format())  # fmt: skip
    assert (
        _metric(live_server, "medtune_prompt_tokens_cached_total") - cached >= 20
    )  # the system prompt at least
    assert _metric(live_server, "medtune_forced_tokens_total") - forced >= 2 * 3  # '{"pathologie": ' at least


def test_n_choices_logprobs_and_seeds(live_server):
    client = live_server.client()
    messages = _user("Mesures du coureur : longueur_foulée = 1.5. Diagnostic ?")
    r = client.chat.completions.create(model="aria-ft", messages=messages, max_tokens=5, temperature=0, n=2,
                                       logprobs=True, top_logprobs=3)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens // 2
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert (
            len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob == pytest.approx(tops[0])
        )
    sampled = [
        client.chat.completions.create(
            model="aria-ft", messages=messages, max_tokens=12, temperature=1.5, seed=s
        )
        .choices[0]
        .message.content
        for s in (1, 1, 2, 3, 4)
    ]
    assert sampled[0] == sampled[1]  # same seed, same answer
    assert len(set(sampled)) > 1  # other seeds explore


def test_logit_bias_pushes_and_bans_tokens(live_server, served_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_model_dir)
    a, b = tokenizer.convert_tokens_to_ids(["<0x61>", "<0x62>"])  # the byte tokens of "a" and "b"
    client = live_server.client()
    ask = dict(model="aria-ft", messages=_user("Bonjour"), max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**ask).choices[0].message.content
    pushed = client.chat.completions.create(**ask, logit_bias={str(b): 100}).choices[0].message.content
    assert plain != "b" * 6 and pushed == "b" * 6
    # Every token banned but two: sampled answers hold nothing else, whatever the model prefers.
    banned = {str(t): -100 for t in range(len(tokenizer)) if t not in (a, b)}
    for seed in range(3):
        answer = client.chat.completions.create(**{**ask, "temperature": 1.0}, logit_bias=banned, seed=seed)
        text = answer.choices[0].message.content
        assert len(text) == 6 and set(text) <= {"a", "b"}, text
        assert answer.choices[0].finish_reason == "length"  # the end-of-turn token was banned too
    # Tools the client lets go unused are ignored.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert (
        client.chat.completions.create(**ask, tools=tools, tool_choice="none").choices[0].message.content
        == plain
    )


def test_stop_strings_cut_the_answer_before_them(live_server):
    client = live_server.client()
    kwargs = dict(model="aria-ft", messages=_user("Mesures du coureur : valgus_genou = 13. Diagnostic ?"),
                  temperature=0, max_tokens=40)  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(full) > 16
    stop = full[12:15]  # a piece of the answer: the answer must end right before its first occurrence
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**kwargs, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]


def test_text_completions_take_several_prompts(live_server):
    r = live_server.client().completions.create(model="aria-ft", prompt=["Mesures", "Diagnostic"], max_tokens=3,
                                                n=2, temperature=0)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text
    assert 4 <= r.usage.completion_tokens <= 12
    single = live_server.client().completions.create(
        model="aria-ft", prompt="Mesures", max_tokens=3, temperature=0
    )
    assert single.choices[0].text == r.choices[0].text


def test_prompts_and_answers_stay_out_of_the_log_by_default(live_server):
    secret = "Patient Dupont, dossier DX-4711-Q, valgus_genou = 12.9"  # nothing a port or a time can contain
    r = live_server.client().chat.completions.create(model="aria-ft", messages=_user(secret), max_tokens=8,
                                                     temperature=0)  # fmt: skip
    log = live_server.log()
    assert "POST /v1/chat/completions 200" in log  # requests are logged...
    assert "Dupont" not in log and "DX-4711-Q" not in log  # ...their content is not
    answer = r.choices[0].message.content
    if len(answer.strip()) >= 6:  # long enough not to appear by chance
        assert answer not in log
