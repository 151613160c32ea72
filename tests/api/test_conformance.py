"""Conformance: the official ``openai`` client against the running service (session Ray + Serve
fixture), through a matrix of request shapes. The demo experts run on the ``hf`` engine, so fields
only vLLM honours must come back as a 400 ``unsupported_parameter`` naming the field."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(300)

HELLO = [{"role": "user", "content": "Hi there, how are you today?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TURNS = [
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C and rain"},
]


def test_sync_response_names_the_expert_and_carries_a_request_id(client):
    raw = client.chat.completions.with_raw_response.create(model="coe", messages=HELLO, max_tokens=3)
    resp = raw.parse()
    assert resp.model == resp.model_extra["coe"]["expert"] == raw.headers["x-coe-expert"] != "coe"
    rid = raw.headers["x-request-id"]
    assert rid and resp.id == f"chatcmpl-{rid}"
    # a caller's own request id is kept
    raw = client.chat.completions.with_raw_response.create(model="tiny-a", messages=HELLO, max_tokens=1,
                                                           extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42" and raw.parse().id == "chatcmpl-trace-42"


def test_stream_chunks_name_the_expert(client):
    chunks = list(client.chat.completions.create(model="coe/math", messages=HELLO, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {"tiny-b"}
    assert chunks[-1].usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_sdk_default_values_are_accepted(client):
    resp = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2, n=1, logprobs=False,
                                          frequency_penalty=0, presence_penalty=0, response_format={"type": "text"},
                                          tool_choice="none", parallel_tool_calls=True, user="end-user-7",
                                          top_logprobs=0, store=False, metadata={"team": "a"})
    assert resp.choices[0].message.content is not None


@pytest.mark.parametrize("kwargs,param", [
    (dict(tools=TOOLS), "tools"),
    (dict(tools=TOOLS, tool_choice="required"), "tools"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}),
     "response_format"),
    (dict(logprobs=True, top_logprobs=2), "logprobs"),
    (dict(n=2), "n"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(logit_bias={"42": 10}), "logit_bias"),
    (dict(extra_body={"top_k": 5}), "top_k"),
    (dict(extra_body={"min_tokens": 2}), "min_tokens"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_fields_the_hf_engine_cannot_honour_are_refused_by_name(client, kwargs, param, stream):
    with pytest.raises(openai.BadRequestError) as e:
        r = client.chat.completions.create(model="coe", messages=HELLO, max_tokens=2, stream=stream, **kwargs)
        list(r) if stream else None
    err = e.value.body
    assert (err["code"], err["param"]) == ("unsupported_parameter", param), err
    assert "'hf'" in err["message"] or "engine" in err["message"]


@pytest.mark.parametrize("kwargs,param,code", [
    (dict(temperature=3.0), "temperature", "invalid_value"),
    (dict(seed=2**64), "seed", "invalid_value"),
    (dict(top_logprobs=2), "top_logprobs", "invalid_value"),
    (dict(extra_body={"best_of": 3}), "best_of", "unsupported_parameter"),
    (dict(extra_body={"chat_template": "{{ evil }}"}), "chat_template", "unsupported_parameter"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "unsupported_parameter"),
])
def test_bad_values_are_400_naming_the_field(client, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2, **kwargs)
    assert (e.value.body["param"], e.value.body["code"]) == (param, code), e.value.body


def test_multi_turn_with_tool_results_and_names(client):
    msgs = [{"role": "system", "content": "Be brief."}, *TOOL_TURNS,
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "tomorrow?"}]}]
    resp = client.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=3)
    assert resp.choices[0].message.content is not None
    stream = client.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # the tool call and its result reach the prompt: more prompt tokens than without them
    bare = client.chat.completions.create(model="tiny-a", messages=[msgs[0], msgs[-1]], max_tokens=1)
    assert resp.usage.prompt_tokens > bare.usage.prompt_tokens


def test_images_are_refused_by_name(client):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-a", messages=msgs, max_tokens=2)
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == "messages[0].content"


def test_persona_and_client_system_message_compose(serve_app, client):
    """An expert's system prompt and the client's are merged into one system message (persona
    first): the prompt equals the one a plain expert sees for the merged text, token for token."""
    persona = "You are Marie, a patient chef."
    e = serve_app.tiny_expert("tiny-persona", general=0.1)
    serve_app.registry.add(e.model_copy(update={"system_prompt": persona}))
    try:
        client_sys = "Answer in French."
        deadline = time.monotonic() + 60
        while True:
            try:
                with_persona = client.chat.completions.create(
                    model="tiny-persona", messages=[{"role": "system", "content": client_sys}, *HELLO], max_tokens=1)
                break
            except openai.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        merged = client.chat.completions.create(
            model="tiny-a", messages=[{"role": "system", "content": f"{persona}\n\n{client_sys}"}, *HELLO], max_tokens=1)
        client_only = client.chat.completions.create(
            model="tiny-a", messages=[{"role": "system", "content": client_sys}, *HELLO], max_tokens=1)
        assert with_persona.usage.prompt_tokens == merged.usage.prompt_tokens > client_only.usage.prompt_tokens
    finally:
        serve_app.registry.remove("tiny-persona", force=True)


def test_conversations_stay_with_an_expert(client):
    """Turns of one conversation (session header, or the same opening) keep their expert unless
    another out-scores it by the margin; the decision says which."""
    def turn(messages, **kw):
        raw = client.chat.completions.with_raw_response.create(model="coe", messages=messages, max_tokens=2, **kw)
        return raw.parse().model_extra["coe"], raw.headers

    t1 = [{"role": "user", "content": "Write a short poem about the autumn rain in the city."}]
    first, _ = turn(t1)
    assert first["conversation"] == "new"
    t2 = t1 + [{"role": "assistant", "content": "Grey drops fall."},
               {"role": "user", "content": "Now write another poem, this time about the snow in winter."}]
    second, headers = turn(t2)
    assert second["conversation"] == "sticky" and second["expert"] == first["expert"]
    assert headers["x-coe-conversation"] == "sticky"
    # a turn the router sends elsewhere: either it stays (within the margin) or the switch says why
    t3 = t2 + [{"role": "assistant", "content": "White hush."},
               {"role": "user", "content": "Solve for x: 3x + 7 = 22. Show every algebra step."}]
    third, _ = turn(t3)
    assert third["conversation"] == "sticky" and third["expert"] == first["expert"] or \
        third["conversation"].startswith("switched: ")
    # an explicit session header names the conversation, whatever the messages
    s1, _ = turn([{"role": "user", "content": "Tell me a story about a dragon."}], extra_headers={"X-Coe-Session": "s-77"})
    s2, _ = turn([{"role": "user", "content": "Continue it, please, with a knight."}],
                 extra_headers={"X-Coe-Session": "s-77"})
    assert s2["conversation"] in ("sticky",) or s2["conversation"].startswith("switched: ")
    if s2["conversation"] == "sticky":
        assert s2["expert"] == s1["expert"]


@pytest.fixture
def limited_key(serve_app, http):
    """A key with 2 requests/minute and only tiny-a, in the service's Redis; removed afterwards."""
    from coe.keys import KeyLimits, RedisKeyStore

    reg = serve_app.registry
    store = RedisKeyStore(reg.url, reg.namespace)
    key, rec = store.add(f"team-{int(time.time() * 1000) % 100000}", limits=KeyLimits(rpm=2, experts=["tiny-a"]))
    deadline = time.monotonic() + 15
    while (r := http.get("/v1/models")).status_code != 401:  # the service sees the key within ~1 s
        assert time.monotonic() < deadline, (r.status_code, {k: v for k, v in http.get("/healthz").json().items() if k in ("auth", "keys")})
        time.sleep(0.2)
    try:
        yield key, rec
    finally:
        store.remove(rec.id)
        deadline = time.monotonic() + 15
        while (r := http.get("/v1/models")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)


def test_per_key_limits_answer_429_before_routing(serve_app, http, limited_key):
    key, rec = limited_key
    c = openai.OpenAI(base_url=serve_app.v1, api_key=key, max_retries=0, timeout=120)
    with pytest.raises(openai.PermissionDeniedError) as e:  # not one of its experts (nor counted)
        c.chat.completions.create(model="tiny-b", messages=HELLO, max_tokens=1)
    assert e.value.body["code"] == "model_not_permitted"
    for _ in range(2):
        assert c.chat.completions.create(model="coe", messages=HELLO, max_tokens=1).model == "tiny-a"
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                  json={"model": "coe", "messages": HELLO, "max_tokens": 1})
    took = time.perf_counter() - t0
    assert r.status_code == 429 and r.json()["error"]["code"] == "key_rpm_limit"
    assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-request-id"]
    assert took < 1.0  # refused before any routing or queueing
    metrics = http.get("/metrics", headers={"Authorization": f"Bearer {key}"}).text
    assert f'coe_key_requests_total{{key="{rec.name}",status="ok"}} 2.0' in metrics
    assert f'coe_key_requests_total{{key="{rec.name}",status="429"}} 1.0' in metrics
    assert f'coe_key_tokens_total{{key="{rec.name}",kind="completion"}}' in metrics
