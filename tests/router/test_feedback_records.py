"""Feedback records in a real Redis (coe/feedback.py), the router replica's watcher and the router
rebuilt from them: replace-not-add, unknown ids, per-key caps, retention, pick-up without restart."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from coe.feedback import FeedbackConfig, FeedbackLimit, FeedbackStore, UnknownRequest, clip_prompt


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def make_store(redis_url):
    made = []

    def make(**cfg) -> FeedbackStore:
        s = FeedbackStore(redis_url, f"fb-{uuid.uuid4().hex[:8]}", FeedbackConfig(**cfg), clock=Clock())
        made.append(s)
        return s

    yield make
    for s in made:
        keys = list(s.r.scan_iter(f"coe:{s.namespace}:*"))
        if keys:
            s.r.delete(*keys)


def test_feedback_replaces_never_adds_and_needs_a_known_request(make_store):
    s = make_store()
    s.remember("r1", "tiny-a", "general", "Hello there", key_id="k1")
    rec, replaced = s.add("r1", 0.0, "k1")
    assert (rec.expert, rec.category, rec.prompt, rec.score, replaced) == ("tiny-a", "general", "Hello there", 0.0, False)
    rec, replaced = s.add("r1", 1.0, "k1")  # the user changed their mind
    assert replaced and s.records()[1]["k1/r1"].score == 1.0 and len(s.records()[1]) == 1
    with pytest.raises(UnknownRequest):
        s.add("never-seen", 1.0, "k1")
    with pytest.raises(UnknownRequest):  # another key's request is as unknown as a missing one
        s.add("r1", 0.0, "k2")
    assert s.add("r1", 0.5, "k2", admin=True)[1]  # an admin key may score any request
    s.remember("open", "tiny-b", "math", "2+2?", key_id=None)  # auth off: anyone may score it
    assert s.add("open", 1.0, None)[0].expert == "tiny-b"


def test_one_key_moves_one_expert_by_at_most_its_daily_cap(make_store):
    s = make_store(per_key_expert_day=2)
    for i in range(4):
        s.remember(f"r{i}", "tiny-a", "general", f"prompt {i}", key_id="k1")
    s.remember("b0", "tiny-b", "math", "prompt b", key_id="k1")
    s.add("r0", 0.0, "k1")
    s.add("r1", 0.0, "k1")
    s.add("r1", 0.2, "k1")  # replacing is not a new record: within the cap
    with pytest.raises(FeedbackLimit) as e:
        s.add("r2", 0.0, "k1")
    assert 0 < e.value.retry_after_s <= 86_400
    s.add("b0", 0.0, "k1")  # the cap is per expert
    assert set(s.records()[1]) == {"k1/r0", "k1/r1", "k1/b0"}
    s.clock.t += 86_400  # the next UTC day
    s.add("r2", 0.0, "k1")


def test_requests_and_records_are_bounded_and_expire(make_store):
    s = make_store(max_requests=3, max_records=2, record_ttl_s=3600)
    for i in range(5):
        s.clock.t += 1
        s.remember(f"r{i}", "tiny-a", "general", f"prompt {i}", key_id=None)
    assert s.request("r0") is None and s.request("r1") is None and s.request("r4") is not None
    for rid in ("r2", "r3", "r4"):
        s.clock.t += 1
        s.add(rid, 1.0, None)
    assert set(s.records()[1]) == {"-/r3", "-/r4"}  # the cap dropped the oldest record
    assert s.r.hlen(s.records_key) == 2
    s.clock.t += 3600 + 10
    assert s.records()[1] == {}  # past the retention, records no longer count
    assert s.r.ttl(s._req_key(s.stored_id("r4", None))) > 86_000  # a request can be scored for 24 h (Redis expiry)
    assert len(clip_prompt("x" * 5000, 2000)) <= 2000


def test_router_learns_the_records_and_forgets_replaced_ones():
    from coe.feedback import FeedbackRecord
    from coe.feedback_quality import FeedbackRouter
    from routers.router import Router

    base = Router.default()
    fr = FeedbackRouter(base)
    assert fr.build({}) is base
    now = time.time()
    recs = {f"r{i}": FeedbackRecord(request_id=f"r{i}", expert="tiny-a", category="general",
                                    prompt=f"Hi, how are you doing today? ({i})", score=0.0, at=now + i)
            for i in range(3)}
    r = fr.build(recs)
    emb = r.embed(["Hi there, how are you?"])[0]
    assert r.quality.predict(emb, ["tiny-a", "tiny-b"]) == {"tiny-a": pytest.approx(0.0), "tiny-b": None}
    recs = {k: v.model_copy(update={"score": 1.0}) for k, v in recs.items()}  # replaced: now all good
    r = fr.build(recs)
    assert len(r.quality.experts) == 3 and r.quality.predict(emb, ["tiny-a"])["tiny-a"] == pytest.approx(1.0)
    assert r.classifier is base.classifier and base.quality is None  # stage 1 and the trained router untouched


async def test_watcher_picks_up_feedback_without_a_restart(make_store, redis_url):
    from coe.serve.feedback_watch import FeedbackWatcher

    s = make_store()
    s.remember("r1", "tiny-a", "general", "Hello", key_id=None)
    seen: list[dict] = []
    w = FeedbackWatcher(redis_url, s.namespace, s.cfg, poll_s=60,
                        on_change=lambda recs: seen.append(recs))
    await w.start()
    try:
        assert seen == [{}]
        s.add("r1", 0.0, None)
        deadline = time.monotonic() + 5  # pub/sub, not the 60 s poll
        while (not seen[-1] or seen[-1]["-/r1"].score != 0.0) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert seen[-1]["-/r1"].score == 0.0
        s.add("r1", 1.0, None)
        while seen[-1]["-/r1"].score != 1.0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(seen[-1]) == 1 and seen[-1]["-/r1"].score == 1.0
    finally:
        await w.stop()



def test_a_request_id_is_the_key_s_own_whoever_reuses_it(make_store):
    """Issue 24 item 5: tenant B sent tenant A's X-Request-Id. A's feedback then got 404 and B's
    replaced the admin's score on A's request. Ids are namespaced by the key that made the request."""
    s = make_store()
    s.remember("shared-id", "tiny-a", "math", "2+2?", key_id="A")
    assert s.add("shared-id", 1.0, "admin", admin=True)[0].expert == "tiny-a"  # the admin scores A's answer
    s.remember("shared-id", "tiny-b", "math", "3+3?", key_id="B")  # B reuses A's id
    rec, replaced = s.add("shared-id", 0.0, "B")  # B's feedback lands on B's own request ...
    assert rec.expert == "tiny-b" and not replaced
    records = s.records()[1]
    assert records["A/shared-id"].score == 1.0 and records["B/shared-id"].score == 0.0  # ... never on A's
    assert s.add("shared-id", 0.5, "A")[0].expert == "tiny-a"  # A can still score its own request
    with pytest.raises(UnknownRequest):  # two keys used the id: an admin must not guess which
        s.add("shared-id", 0.2, "admin", admin=True)
