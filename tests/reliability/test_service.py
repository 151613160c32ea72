"""Reliability of the real service (Ray Serve app, real Redis, tiny experts and SmolLM2), through HTTP.

Shares the session app of tests/conftest.py (``serve_app``: one Ray/Serve start for tests/serve and
tests/reliability). Tests that break something (Redis down, a pool replica killed, a broken expert)
restore it and wait until the service is healthy again, so later tests see a normal app."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(300)

HELLO = [{"role": "user", "content": "Hi there, how are you today?"}]
LONG = [{"role": "user", "content": "Tell me a very long story about a dragon, a knight and a village."}]


def _err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def _in_flight(http: httpx.Client, expert: str) -> float:
    """Requests generating on ``expert`` across pool replicas (from /metrics)."""
    text = http.get("/metrics").text
    vals = [float(m.group(1)) for m in re.finditer(
        r'^coe_expert_in_flight\{[^}]*expert="' + re.escape(expert) + r'"[^}]*\} (\S+)$', text, re.M)]
    return sum(vals)


def _ok(http: httpx.Client, model: str = "tiny-a", **kw) -> httpx.Response:
    r = http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2, **kw})
    assert r.status_code == 200, r.text
    return r


# ----------------------------------------------------------------------------------------- security
def test_api_keys_guard_every_v1_route(serve_app, http):
    """With a key configured (`coe keys add`, hashed in the registry's Redis), /v1/* answers 401
    without it or with a wrong one, 200 with it; /healthz stays open; revoking re-opens."""
    reg = serve_app.registry
    env = {**os.environ, "COE_REDIS_URL": reg.url, "COE_NAMESPACE": reg.namespace}
    coe = [sys.executable, "-m", "coe.cli"]
    out = subprocess.run([*coe, "keys", "add", "ci-user"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = re.search(r"coe-[A-Za-z0-9_-]{40,}", out.stdout).group(0)
    try:
        import redis

        stored = redis.Redis.from_url(reg.url, decode_responses=True).hgetall(f"coe:{reg.namespace}:apikeys")
        assert stored and key not in json.dumps(stored)  # only its hash is stored
        # the running service picks the new key up without a restart (re-read within ~1 s)
        wait_until(lambda: http.get("/v1/models").status_code == 401, 15, what="auth to switch on")
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions",
                                   {"model": "tiny-a", "messages": HELLO, "max_tokens": 1}),
                                   ("POST", "/v1/route", {"model": "coe", "messages": HELLO}),
                                   ("GET", "/v1/no-such-route", None)]:
            r = http.request(method, path, json=body)
            assert r.status_code == 401 and _err(r)["code"] == "missing_api_key", (path, r.text)
            r = http.request(method, path, json=body, headers={"Authorization": "Bearer coe-not-a-real-key"})
            assert r.status_code == 401 and _err(r)["code"] == "invalid_api_key", (path, r.text)
        assert http.get("/healthz").status_code == 200
        c = openai.OpenAI(base_url=serve_app.v1, api_key=key, max_retries=0, timeout=120)
        assert c.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2).choices
        chunks = list(c.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=2, stream=True))
        assert chunks
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=serve_app.v1, api_key="wrong", max_retries=0).models.list()
        out = subprocess.run([*coe, "keys", "list"], env=env, capture_output=True, text=True, timeout=60)
        assert "ci-user" in out.stdout and key not in out.stdout
    finally:
        out = subprocess.run([*coe, "keys", "remove", "ci-user"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    wait_until(lambda: http.get("/v1/models").status_code == 200, 15, what="auth to switch off")


# ----------------------------------------------------------------------------------------- bad input
BIG = "x" * (1024 * 1024 + 10)  # just over the default 1 MiB limit
BAD_INPUTS = [
    ("malformed json", b'{"model": "coe", "messages": [', 400, "invalid_json"),
    ("json array", b"[1, 2, 3]", 400, None),
    ("json null", b"null", 400, None),
    ("empty body", b"", 400, None),
    ("not utf-8", b'{"model": "tiny-a", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}', 400,
     "invalid_encoding"),
    ("messages not a list", {"model": "tiny-a", "messages": "hello"}, 400, None),
    ("content wrong type", {"model": "tiny-a", "messages": [{"role": "user", "content": 42}]}, 400, None),
    ("max_tokens a string", {"model": "tiny-a", "messages": HELLO, "max_tokens": "ten"}, 400, None),
    ("temperature wrong type", {"model": "tiny-a", "messages": HELLO, "temperature": "hot"}, 400, None),
    ("stream wrong type", {"model": "tiny-a", "messages": HELLO, "stream": "perhaps"}, 400, None),
    ("model wrong type", {"model": ["tiny-a"], "messages": HELLO}, 400, None),
    ("empty messages", {"model": "tiny-a", "messages": []}, 400, None),
    ("empty content", {"model": "tiny-a", "messages": [{"role": "user", "content": ""}]}, 400, None),
    ("only system", {"model": "tiny-a", "messages": [{"role": "system", "content": "be nice"}]}, 400, None),
    ("unknown role", {"model": "tiny-a", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("image part", {"model": "tiny-a", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, None),
    ("max_tokens 0", {"model": "tiny-a", "messages": HELLO, "max_tokens": 0}, 400, None),
    ("max_tokens negative", {"model": "tiny-a", "messages": HELLO, "max_tokens": -5}, 400, None),
    ("max_tokens beyond context", {"model": "tiny-a", "messages": HELLO, "max_tokens": 10_000}, 400,
     "context_length_exceeded"),
    ("max_tokens absurd", {"model": "coe", "messages": HELLO, "max_tokens": 10 ** 30}, 400, None),
    ("unknown model", {"model": "gpt-17", "messages": HELLO}, 404, "model_not_found"),
    ("unknown category", {"model": "coe/astrology", "messages": HELLO}, 404, "model_not_found"),
    ("stop not strings", {"model": "tiny-a", "messages": HELLO, "stop": [1, 2]}, 400, None),
    ("stop empty string", {"model": "tiny-a", "messages": HELLO, "stop": [""]}, 400, None),
    ("too many stops", {"model": "tiny-a", "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
    ("huge body", {"model": "tiny-a", "messages": [{"role": "user", "content": BIG}]}, 413, "request_too_large"),
    ("huge prompt under byte limit", {"model": "tiny-a", "messages": [{"role": "user", "content": "word " * 5000}]},
     400, "context_length_exceeded"),
]


@pytest.mark.parametrize("name, body, status, code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_an_openai_4xx(http, name, body, status, code):
    if isinstance(body, bytes):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text[:500]
    err = _err(r)
    assert err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code, err


def test_still_serving_after_bad_inputs(http):
    _ok(http)
    _ok(http, model="coe", stream=False)


# ----------------------------------------------------------------------------------------- load
def test_full_queue_is_429_with_retry_after_not_growth(serve_app, http):
    """More concurrent requests for one expert than its queue holds (the session app's pool has
    max_queue_per_expert=8, max_batch_size=4): the excess gets 429 + Retry-After at once, everyone
    gets an answer, and the expert serves normally afterwards."""
    body = {"model": "tiny-b", "messages": LONG, "max_tokens": 300, "temperature": 0}

    def one(_):
        with httpx.Client(base_url=serve_app.base, timeout=180) as c:
            t = time.monotonic()
            r = c.post("/v1/chat/completions", json=body)
            return r.status_code, r.headers.get("retry-after"), time.monotonic() - t, r.text[:300]

    with cf.ThreadPoolExecutor(48) as ex:
        results = list(ex.map(one, range(48)))
    statuses = [s for s, *_ in results]
    assert set(statuses) <= {200, 429}, [r for r in results if r[0] not in (200, 429)][:3]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    for s, retry_after, elapsed, text in results:
        if s == 429:
            assert retry_after and int(retry_after) >= 1
            assert json.loads(text)["error"]["type"] == "rate_limit_error"
    _ok(http, model="tiny-b")


def test_client_disconnect_mid_stream_cancels_generation(serve_app, http):
    """A client that goes away mid-stream frees its slot at once, not after max_tokens more tokens."""
    _ok(http, model="smollm2")  # loaded (first load is not what this test measures)
    body = {"model": "smollm2", "messages": LONG, "max_tokens": 1500, "temperature": 1.0, "stream": True}
    with httpx.Client(base_url=serve_app.base, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # held, not abandoned: dropping the iterator would close the connection
            got = 0
            while got < 3:
                line = next(lines)
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    got += 1
            wait_until(lambda: _in_flight(http, "smollm2") >= 1, 10, what="the stream to show as in flight")
            lines.close()
    # connection closed here; 1500 tokens would take minutes at SmolLM2's CPU speed
    t0 = time.monotonic()
    wait_until(lambda: _in_flight(http, "smollm2") == 0, 20, what="the cancelled stream's slot to be freed")
    assert time.monotonic() - t0 < 20
    _ok(http, model="smollm2")


def test_per_request_timeout(serve_app, http):
    """``limits.request_timeout_s`` (a client may ask for less with ``X-Coe-Timeout``): a stream past
    its deadline ends with an error event, a non-streamed request gets a 504 — never a hang — and
    the generation is cancelled."""
    body = {"model": "smollm2", "messages": LONG, "max_tokens": 1500, "temperature": 1.0}
    t0 = time.monotonic()
    r = http.post("/v1/chat/completions", json=body, headers={"X-Coe-Timeout": "2"})
    assert r.status_code == 504 and _err(r)["code"] == "request_timeout"
    assert "within 2 s" in _err(r)["message"]  # the limit that was set, not what was left of it
    assert time.monotonic() - t0 < 15
    t0 = time.monotonic()
    with httpx.Client(base_url=serve_app.base, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                      headers={"X-Coe-Timeout": "2"}) as r:
            events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert time.monotonic() - t0 < 15
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert errors and errors[0]["code"] == "request_timeout"
    assert events[-1] == "[DONE]"
    wait_until(lambda: _in_flight(http, "smollm2") == 0, 20, what="timed-out generations to be cancelled")


# ----------------------------------------------------------------------------------------- faults
def test_failed_expert_is_marked_and_its_requests_fall_back(serve_app, http, tmp_path):
    """An expert whose files are corrupt: the pool starts it in the background when it is added
    (item 4 of issue 13), finds the files broken and the registry marks it failed with the reason
    before a request needs it (or, if a request gets there first, that request is answered by the
    next-best candidate and says so); routed requests go elsewhere; the rest keep serving."""
    reg = serve_app.registry
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (bad / "model.safetensors").write_bytes(b"\x00\x00\x00\x00\x00\x00\x00\x10not a safetensors file")
    old_map = reg.get_map()
    reg.add(serve_app.tiny_expert("broken", coding=1.0, general=0.1).model_copy(update={"model": str(bad)}))
    reg.set_map({**old_map, "coding": ["broken", "tiny-a"]})
    try:
        r = http.post("/v1/chat/completions", json={"model": "coe/coding", "messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200, r.text
        coe = r.json()["coe"]
        assert coe["expert"] == "tiny-a" and r.headers["x-coe-expert"] == "tiny-a"
        if r.headers.get("x-coe-fallback-from"):  # the request reached it before the background start
            assert r.headers["x-coe-fallback-from"] == "broken" and "broken" in (coe["fallback_reason"] or "")
        spec = wait_until(lambda: (e := reg.get("broken")).status == "failed" and e, 10, what="status=failed")
        assert "model.safetensors" in spec.status_reason or "safetensors" in spec.status_reason
        card = wait_until(lambda: (c := {m["id"]: m for m in http.get("/v1/models").json()["data"]}["broken"])["status"]
                     == "failed" and c, 10, what="/v1/models to show the failure")
        assert "safetensors" in card["status_reason"]
        # later requests skip it without trying; asking for it by name is a clear 503, not a hang
        r = http.post("/v1/chat/completions", json={"model": "coe/coding", "messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["coe"]["expert"] == "tiny-a"
        r = http.post("/v1/chat/completions", json={"model": "broken", "messages": HELLO, "max_tokens": 2})
        assert r.status_code == 503 and "broken" in _err(r)["message"]
        _ok(http, model="tiny-b")
        # fixed files + marked ready again: it serves (no restart)
        for f in serve_app.tiny_dir.iterdir():
            shutil.copy(f, bad / f.name)
        reg.set_status("broken", "ready")
        r = wait_until(lambda: (r := http.post("/v1/chat/completions", json={
            "model": "broken", "messages": HELLO, "max_tokens": 2})).status_code == 200 and r, 30,
            what="the repaired expert to serve")
        assert r.json()["coe"]["expert"] == "broken"
    finally:
        reg.set_map(old_map)
        reg.remove("broken", force=True)


def test_redis_down_keeps_serving_degraded_and_cli_fails_clearly(serve_app, http, redis_server):
    reg = serve_app.registry
    before = {e.name for e in reg.list()}
    redis_server.stop()
    try:
        h = wait_until(lambda: (j := http.get("/healthz").json())["status"] == "degraded" and j, 30,
                  what="/healthz to report degraded")
        assert h["registry"]["reachable"] is False and h["registry"]["error"]
        # still routing (last snapshot) and answering, automatic routing included
        _ok(http, model="tiny-a")
        r = _ok(http, model="coe")
        assert r.json()["coe"]["expert"] in before
        assert http.get("/v1/models").status_code == 200
        # the CLI refuses with a one-line message naming the URL and changes nothing
        env = dict(os.environ, COE_REDIS_URL=redis_server.url, COE_NAMESPACE=reg.namespace)
        out = subprocess.run([sys.executable, "-m", "expert_registry", "list"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode != 0 and "cannot reach Redis" in out.stderr and "Traceback" not in out.stderr
        out = subprocess.run([sys.executable, "-m", "expert_registry", "remove", "tiny-a", "--force"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "cannot reach Redis" in out.stderr
    finally:
        redis_server.start()
    wait_until(lambda: http.get("/healthz").json()["status"] == "ok", 60, what="/healthz ok after Redis is back")
    assert {e.name for e in reg.list()} == before
    _ok(http, model="tiny-a")


def test_pool_replica_death_fails_in_flight_cleanly_and_recovers(serve_app, http):
    import ray

    _ok(http, model="tiny-a")
    body = {"model": "smollm2", "messages": LONG, "max_tokens": 1500, "temperature": 1.0, "stream": True}
    result: dict = {}

    def stream():
        t0 = time.monotonic()
        try:
            with httpx.Client(base_url=serve_app.base, timeout=httpx.Timeout(120)) as c:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    result["status"] = r.status_code
                    result["events"] = []
                    for ln in r.iter_lines():
                        if ln.startswith("data: "):
                            result["events"].append(ln[6:])
        except httpx.HTTPError as e:  # a cut connection is a clean failure too; a hang is not
            result["exc"] = repr(e)
        result["elapsed"] = time.monotonic() - t0

    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(stream)
        wait_until(lambda: len(result.get("events", [])) >= 3, 60, what="the stream to start")
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "ExpertPool" in a["name"] and "SERVE_REPLICA" in a["name"]]
        assert names, ray.util.list_named_actors(all_namespaces=True)
        for n in names:
            ray.kill(ray.get_actor(n, namespace="serve"), no_restart=True)
        t_kill = time.monotonic()
        fut.result(timeout=90)
    assert time.monotonic() - t_kill < 60
    events = result.get("events", [])
    assert "exc" in result or any('"error"' in e for e in events), result
    assert not any('"finish_reason":"length"' in e for e in events)  # it did not pretend to finish
    # Serve starts a new replica; new requests succeed
    wait_until(lambda: http.post("/v1/chat/completions", timeout=60,
                            json={"model": "tiny-a", "messages": HELLO, "max_tokens": 2}).status_code == 200,
          150, every=2, what="a request to succeed after the replica restart")
