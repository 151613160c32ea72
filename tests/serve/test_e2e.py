"""End to end through HTTP: the real app on Ray, the real openai client and httpx."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(300)

HELLO = [{"role": "user", "content": "Hi there, how are you today?"}]
MATH = [{"role": "user", "content": "Solve for x: 3x + 7 = 22. Show the algebra."}]


def test_chat_routes_automatically_and_reports_the_decision(client):
    raw = client.chat.completions.with_raw_response.create(model="coe", messages=HELLO, max_tokens=5)
    resp = raw.parse()
    coe = resp.model_extra["coe"]
    assert coe["expert"] in {"tiny-a", "tiny-b", "smollm2"}
    assert raw.headers["x-coe-expert"] == coe["expert"]
    assert raw.headers["x-coe-category"] == coe["category"]
    assert float(raw.headers["x-coe-route-ms"]) >= 0
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens >= 1
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.completion_tokens <= 5


def test_stream_sends_decision_first_usage_last_and_done(serve_app, client):
    stream = client.chat.completions.create(model="coe/math", messages=MATH, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].model_extra["coe"]["category"] == "math"
    assert chunks[0].model_extra["coe"]["expert"] == "tiny-b"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    # the raw SSE ends with [DONE]
    with httpx.stream("POST", serve_app.v1 + "/chat/completions", timeout=120,
                      json={"model": "tiny-a", "messages": HELLO, "max_tokens": 2, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-coe-expert"] == "tiny-a"
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["coe"]["forced"] == "expert"


def test_forced_category_and_explicit_expert(client):
    r = client.chat.completions.with_raw_response.create(model="coe/math", messages=HELLO, max_tokens=2)
    assert r.headers["x-coe-category"] == "math" and r.headers["x-coe-expert"] == "tiny-b"
    assert r.parse().model_extra["coe"]["forced"] == "category"
    r = client.chat.completions.with_raw_response.create(model="tiny-b", messages=HELLO, max_tokens=2,
                                                         temperature=0.5, top_p=0.9, seed=7, stop=["\n\n"])
    assert r.headers["x-coe-expert"] == "tiny-b"
    assert r.parse().model_extra["coe"]["forced"] == "expert"


def test_max_completion_tokens_and_seed_are_honoured(client):
    kw = dict(model="tiny-a", messages=HELLO, max_completion_tokens=4, temperature=1.0, seed=123)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.usage.completion_tokens <= 4
    assert a.choices[0].message.content == b.choices[0].message.content  # same seed, same sample


def test_real_model_answers(client):
    resp = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert "paris" in resp.choices[0].message.content.lower()


def test_route_explains_without_generating(http):
    r = http.post("/v1/route", json={"model": "coe", "messages": MATH})
    assert r.status_code == 200
    body = r.json()
    assert body["coe"]["expert"] == r.headers["x-coe-expert"]
    assert body["coe"]["category_probs"] and body["coe"]["candidates"]
    assert isinstance(body["coe"]["excluded"], dict) and isinstance(body["coe"]["not_candidates"], dict)
    r = http.post("/v1/route", json={"model": "coe/writing", "messages": MATH})
    assert r.json()["coe"]["expert"] == "tiny-a"


def test_models_lists_router_categories_and_experts(client, http):
    ids = {m.id for m in client.models.list()}
    assert {"coe", "coe/math", "coe/general", "tiny-a", "tiny-b", "smollm2"} <= ids
    data = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert data["tiny-a"]["kind"] == "expert" and data["tiny-a"]["status"] == "ready"
    assert data["tiny-a"]["tier"] in {"hbm", "dram", "disk", "unloaded"}
    assert data["coe/math"]["experts"] == ["tiny-b"]


def test_healthz_and_metrics(client, http):
    client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2)
    h = http.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    deadline = time.monotonic() + 15
    while True:
        text = http.get("/metrics").text
        if "coe_queue_depth{" in text or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert 'coe_requests_total{category="none",expert="tiny-a",status="ok"}' in text
    assert "coe_completion_tokens_total" in text and "coe_route_latency_ms_bucket" in text
    assert 'coe_queue_depth{expert="tiny-a"' in text
    assert 'coe_expert_tier{' in text


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "coe", "messages": [', 400, None),
    ({"model": "coe"}, 400, "messages"),
    ({"model": "coe", "messages": []}, 400, "messages"),
    ({"model": "coe", "messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
    ({"model": "no-such-expert", "messages": HELLO}, 404, "model"),
    ({"model": "coe/no-such-category", "messages": HELLO}, 404, "model"),
    ({"model": "tiny-a", "messages": HELLO, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "tiny-a", "messages": HELLO, "n": 2}, 400, "n"),
    ({"model": "tiny-a", "messages": HELLO, "temperature": -1}, 400, "temperature"),
    ({"model": "tiny-a", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
])
def test_bad_input_gets_openai_error_shape(http, body, status, param):
    if isinstance(body, bytes):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] == "invalid_request_error"
    if param:
        assert err["param"] == param


def test_prompt_plus_max_tokens_beyond_context_is_400(client):
    long = "word " * 400  # ~400 tokens; tiny experts have a 512-token context
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": long}], max_tokens=300)
    assert e.value.body["param"] == "max_tokens"


def test_openai_client_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="coe", messages=HELLO, n=3)


def test_hot_add_and_remove_during_traffic(serve_app, client, http):
    reg = serve_app.registry
    reg.add(serve_app.tiny_expert("tiny-hot", coding=0.9))
    # usable on the next request, no restart
    r = client.chat.completions.with_raw_response.create(model="tiny-hot", messages=HELLO, max_tokens=2)
    assert r.headers["x-coe-expert"] == "tiny-hot"
    # not in the category map yet: routed coding requests do not reach it, and /v1/route says why
    why = wait_until(lambda: http.post("/v1/route", json={"model": "coe/coding", "messages": HELLO}).json()["coe"]
                     ["not_candidates"].get("tiny-hot"), 30, what="tiny-hot among /v1/route's not_candidates")
    assert why == "not in the category map for coding (it declares coding=0.9)"
    # a category map change takes effect on the next request
    reg.update_map({"coding": ["tiny-hot"]})
    r = http.post("/v1/route", json={"model": "coe/coding", "messages": HELLO})
    assert r.json()["coe"]["expert"] == "tiny-hot"

    # a long generation is in flight when the expert is removed: it finishes, new requests are refused
    result: dict = {}
    streaming = threading.Event()

    def long_request():
        c = openai.OpenAI(base_url=serve_app.v1, api_key="t", max_retries=0, timeout=180)
        chunks = []
        for ch in c.chat.completions.create(model="tiny-hot", messages=HELLO, max_tokens=450, stream=True,
                                            stream_options={"include_usage": True}):
            chunks.append(ch)
            if ch.choices and ch.choices[0].delta.content:
                streaming.set()
        result["finish"] = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        result["usage"] = chunks[-1].usage

    t = threading.Thread(target=long_request)
    t.start()
    assert streaming.wait(120)
    reg.remove("tiny-hot", force=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = http.post("/v1/chat/completions", json={"model": "tiny-hot", "messages": HELLO, "max_tokens": 1})
        if r.status_code == 404:
            break
        time.sleep(0.2)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    t.join(180)
    assert result["finish"] == ["length"] and result["usage"].completion_tokens == 450
    # then its memory is freed: the pool no longer holds it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if 'expert="tiny-hot"' not in http.get("/metrics").text:
            break
        time.sleep(1)
    assert 'expert="tiny-hot",tier' not in http.get("/metrics").text
    assert "tiny-hot" not in {m.id for m in client.models.list()}
    assert http.post("/v1/route", json={"model": "coe/coding", "messages": HELLO}).json()["coe"]["expert"] != "tiny-hot"


def test_expert_whose_files_break_is_marked_failed_not_a_crash(serve_app, client, http, tmp_path):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(serve_app.tiny_dir, broken)
    spec = serve_app.tiny_expert("tiny-broken").model_copy(update={"model": str(broken)})
    serve_app.registry.add(spec)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    r = http.post("/v1/chat/completions", json={"model": "tiny-broken", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 503, r.text
    assert "tiny-broken" in r.json()["error"]["message"]
    assert serve_app.registry.get("tiny-broken").status == "failed"
    # the service still answers, and the router no longer picks it
    assert client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=1).choices
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        if cards["tiny-broken"]["status"] == "failed":
            break
        time.sleep(0.5)
    assert cards["tiny-broken"]["status"] == "failed" and cards["tiny-broken"]["status_reason"]
    serve_app.registry.remove("tiny-broken", force=True)


def test_readyz_means_every_routable_category_is_warm(serve_app, http):
    """Liveness and readiness apart: /readyz is 200 only once an expert of every routable category
    is loaded and has run once; it names them. (The session fixture waits for it.)"""
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    cats = r.json()["categories"]
    assert cats["math"] == "tiny-b" and cats["general"] == "tiny-a"
    assert set(cats) == {"general", "writing", "math", "stem", "coding", "reasoning", "roleplay",
                         "extraction", "humanities"}
    assert http.get("/healthz").json()["status"] == "ok"


def test_models_lists_only_what_can_be_requested(serve_app, http):
    """A map entry for a category the router does not know is not offered as a model."""
    serve_app.registry.update_map({"cooking": ["tiny-a"]})
    try:
        time.sleep(0.5)
        ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert "coe/cooking" not in ids and "coe/math" in ids
    finally:
        serve_app.registry.update_map({"cooking": None})


def test_http_edge_cases_answer_with_a_hint(http):
    body = json.dumps({"model": "tiny-a", "messages": HELLO})
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = http.post("/v1/chat/completions", content=body, headers=headers)
        assert r.status_code == 415, (headers, r.text)
        assert "Content-Type: application/json" in r.json()["error"]["message"]
    for path in ("/v1/completions", "/v1/embeddings"):
        r = http.post(path, json={"model": "coe", "input": "x"})
        assert r.status_code == 404
        msg = r.json()["error"]["message"]
        assert path in msg and "POST /v1/chat/completions" in msg and "GET /v1/models" in msg


def test_timing_stamps_split_what_the_http_path_adds(serve_app):
    """``x-coe-timing: 1`` (bench/http_overhead.py): the chunk with the first token carries wall-clock
    stamps in the order the request met them; the stream still opens with the role chunk."""
    t0 = time.time()
    with httpx.stream("POST", serve_app.v1 + "/chat/completions", timeout=120, headers={"x-coe-timing": "1"},
                      json={"model": "tiny-a", "messages": HELLO, "max_tokens": 3, "stream": True}) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    t1 = time.time()
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[0]["coe"]["forced"] == "expert"
    stamped = [e for e in events if "coe_timing" in e]
    assert len(stamped) == 1 and stamped[0]["choices"][0]["delta"]["content"]
    t = stamped[0]["coe_timing"]
    assert t0 <= t["received"] <= t["enqueued"] <= t["first_token"] <= t1


def test_a_lone_request_is_not_held_for_the_routers_batch_window(serve_app, redis_url):
    """The router batches requests that arrive together (``router.batch_wait_timeout_s``), but one
    that finds it idle is routed at once, and requests arriving together still get their answers."""
    from ray import serve

    from coe.config import ServeConfig
    from coe.serve.router_deployment import RouterDeployment

    cfg = ServeConfig(redis_url=redis_url, namespace=serve_app.registry.namespace, router={"batch_wait_timeout_s": 3.0})
    try:
        serve.run(RouterDeployment.options(name="SlowBatchRouter", ray_actor_options={"num_cpus": 0.05})
                  .bind(cfg.model_dump(mode="json")), name="coe-slowbatch", route_prefix=None, blocking=False)
        h = serve.get_deployment_handle("SlowBatchRouter", app_name="coe-slowbatch")
        req = {"prompt": "Solve for x: 3x + 7 = 22. Show the algebra.", "model": "coe", "max_tokens": 8}
        first = h.route.remote(req).result(timeout_s=180)  # the replica starts (router loaded from cache)
        took = []
        for _ in range(3):
            t = time.perf_counter()
            d = h.route.remote(req).result(timeout_s=60)
            took.append(time.perf_counter() - t)
            assert d["decision"]["expert"] == first["decision"]["expert"]
        assert min(took) < 1.5, took  # held for the window, each would take >= 3 s
        together = [h.route.remote(req) for _ in range(4)]
        assert {r.result(timeout_s=60)["decision"]["expert"] for r in together} == {first["decision"]["expert"]}
    finally:
        serve.delete("coe-slowbatch")
