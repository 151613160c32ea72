"""Feedback and the warm hint on the real service (Ray Serve, Redis, tiny experts): thumbs-down on the
chosen expert until the router's choice moves, and the pool hearing of the likely expert before
the request itself (issue 14, items 6 and 7)."""

from __future__ import annotations

import uuid

import httpx
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(300)

CAT = "roleplay"
PROMPTS = ("Pretend you are a pirate captain and greet your crew.",
           "Act as a grumpy wizard and tell me about your tower.",
           "You are now a medieval knight; describe your horse.",
           "Play the role of a ship's cook and complain about the food.")
SIMILAR = "Pretend you are a sea captain and say hello."


def _route(http: httpx.Client, text: str) -> str:
    r = http.post("/v1/route", json={"model": f"coe/{CAT}", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()["coe"]["expert"]


def _chat(http: httpx.Client, text: str, rid: str | None = None) -> httpx.Response:
    r = http.post("/v1/chat/completions", headers={"x-request-id": rid} if rid else {},
                  json={"model": f"coe/{CAT}", "messages": [{"role": "user", "content": text}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r


@pytest.fixture
def two_roleplay_experts(serve_app, http):
    """tiny-rp1 (roleplay 0.6) and tiny-rp2 (roleplay 0.55) are the only roleplay experts meanwhile."""
    reg = serve_app.registry
    old_map = {c: list(ns) for c, ns in reg.get_map().items()}
    reg.add(serve_app.tiny_expert("tiny-rp1", roleplay=0.6))
    reg.add(serve_app.tiny_expert("tiny-rp2", roleplay=0.55))
    reg.set_map({**old_map, CAT: ["tiny-rp1", "tiny-rp2"]})

    def started() -> bool:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        return all(cards.get(n, {}).get("status") == "ready" for n in ("tiny-rp1", "tiny-rp2"))

    # Both start on add, in either order, and the hotter one gets a residency bonus (0.1 x tier):
    # wait for both, then use tiny-rp1 once so it is the hot one and the 0.05 capability lead holds
    # on every prompt below before any feedback (CI once saw tiny-rp2 win because it loaded last).
    wait_until(started, 60, every=0.2, what="both roleplay experts to start")
    r = http.post("/v1/chat/completions", json={"model": "tiny-rp1", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "Ahoy."}]})
    assert r.status_code == 200, r.text
    wait_until(lambda: all(_route(http, t) == "tiny-rp1" for t in (*PROMPTS, SIMILAR)), 30, every=0.2,
               what="the new map to be routed")
    yield
    import redis

    reg.set_map(old_map)
    for name in ("tiny-rp1", "tiny-rp2"):
        reg.remove(name, force=True)
    r = redis.Redis.from_url(reg.url, decode_responses=True)
    keys = list(r.scan_iter(f"coe:{reg.namespace}:fb:*"))
    if keys:
        r.delete(*keys)
    r.incr(f"coe:{reg.namespace}:fb:version")
    r.publish(f"coe:{reg.namespace}:feedback", "")  # router replicas re-read: no feedback left


def test_thumbs_down_moves_routing_without_a_restart(http, two_roleplay_experts):
    downs = 0
    for text in PROMPTS:
        r = _chat(http, text)
        if r.json()["coe"]["expert"] == "tiny-rp2":
            break
        assert r.json()["coe"]["expert"] == "tiny-rp1"
        fb = http.post("/v1/feedback", json={"request_id": r.json()["id"], "thumbs": "down"})
        assert fb.status_code == 200, fb.text
        assert fb.json() | {"request_id": None} == {"object": "coe.feedback", "request_id": None,
                                                    "expert": "tiny-rp1", "category": CAT, "score": 0.0,
                                                    "replaced": False}
        again = http.post("/v1/feedback", json={"request_id": r.headers["x-request-id"], "score": 0.1})
        assert again.status_code == 200 and again.json()["replaced"] is True  # replaces, never adds
        downs += 1
        # picked up by the router replica without a restart (pub/sub): similar prompts move
        wait_until(lambda: _route(http, SIMILAR) == "tiny-rp2", 15, every=0.2, what="the router to learn the feedback")
    else:
        pytest.fail("routing never moved off the expert that got thumbs down")
    assert 1 <= downs < len(PROMPTS)
    # the other roleplay prompts follow; the decision shows the learned quality that moved it
    body = http.post("/v1/route", json={"model": f"coe/{CAT}", "messages": [
        {"role": "user", "content": "Take on the role of a detective and question me."}]}).json()
    assert body["coe"]["expert"] == "tiny-rp2"
    q = {c["expert"]: c["quality"] for c in body["coe"]["candidates"]}
    assert q["tiny-rp1"] < 0.2  # learned from the thumbs-down (tiny-rp2 has no records)


def test_feedback_refuses_what_it_cannot_record(http):
    r = http.post("/v1/feedback", json={"request_id": "no-such-request", "thumbs": "up"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    rid = _chat(http, "Pretend you are a cat.").headers["x-request-id"]
    for body in ({"request_id": rid}, {"request_id": rid, "score": 1.0, "thumbs": "up"},
                 {"request_id": rid, "score": 1.5}, {"request_id": rid, "thumbs": "sideways"},
                 {"request_id": rid, "score": 1, "comment": "?"}):
        r = http.post("/v1/feedback", json=body)
        assert r.status_code == 400, (body, r.text)


def test_pool_hears_the_likely_expert_before_the_request(serve_app, http):
    from ray import serve

    rid = f"hint-{uuid.uuid4().hex[:12]}"
    r = _chat(http, "Pretend you are a dragon guarding gold.", rid)  # a forced category: a certain hint
    expert = r.json()["coe"]["expert"]
    pool = serve.get_deployment_handle("ExpertPool", app_name="coe")
    events = pool.recent_events.remote(2000).result(timeout_s=30)
    mine = {what.split(" ")[0]: t for t, name, what in events if name == expert and what.endswith(rid)}
    assert set(mine) == {"hint", "request"}, events[-20:]
    assert mine["hint"] < mine["request"]


def test_only_a_permitted_key_scores_and_only_its_own_requests(serve_app, http):
    from coe.keys import KeyLimits, RedisKeyStore

    reg = serve_app.registry
    store = RedisKeyStore(reg.url, reg.namespace)
    alice, _ = store.add("fb-alice")
    carol, _ = store.add("fb-carol")
    bob, _ = store.add("fb-bob", limits=KeyLimits(feedback=False))  # coe keys add fb-bob --no-feedback
    try:
        wait_until(lambda: http.get("/v1/models").status_code == 401, 15, every=0.2, what="auth to switch on")

        def post(key: str, path: str, body: dict) -> httpx.Response:
            return http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})

        r = post(alice, "/v1/chat/completions", {"model": f"coe/{CAT}", "max_tokens": 1,
                                                  "messages": [{"role": "user", "content": "Pretend you are a fox."}]})
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
        assert http.post("/v1/feedback", json={"request_id": rid, "thumbs": "up"}).status_code == 401
        r = post(bob, "/v1/feedback", {"request_id": rid, "thumbs": "up"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "feedback_not_permitted"
        r = post(carol, "/v1/feedback", {"request_id": rid, "thumbs": "down"})  # not carol's request
        assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
        r = post(alice, "/v1/feedback", {"request_id": rid, "thumbs": "up"})
        assert r.status_code == 200 and r.json()["score"] == 1.0
    finally:
        for name in ("fb-alice", "fb-bob", "fb-carol"):
            store.remove(name)
        wait_until(lambda: http.get("/v1/models").status_code == 200, 15, every=0.2, what="auth to switch off")
