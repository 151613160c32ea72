"""Issue 24 item 9: slow bodies held ingress slots. The idle timeout (10 s) applied per gap, so a
rate-limited key sent 300-400 bodies at one byte every 5 s and held them open for 60 s while other
tenants' requests timed out. Now the whole body has a deadline (``limits.body_timeout_s``) and a
key whose request window is full gets its 429 before its body is read. Both are checked on the
real middleware stack pieces: the body reader fed a byte at a time, and the pre-body check against
a real Redis with a real key."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from coe.keys import KeyLimits, RedisKeyStore
from coe.limits import BodyLimitMiddleware
from coe.tenant_limits import TenantLimiter


async def _call(mw, scope, receive) -> tuple[int, dict, dict, float]:
    sent: list[dict] = []

    async def send(msg):
        sent.append(msg)

    t0 = time.monotonic()
    await mw(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body or b"{}"), time.monotonic() - t0


SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"content-length", b"1000")]}


async def test_a_body_that_trickles_in_gets_408_at_the_total_deadline():
    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app must not see a body that never completed")

    async def trickle():  # one byte every 0.2 s: never idle for the 1 s idle timeout
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"{", "more_body": True}

    mw = BodyLimitMiddleware(app, max_bytes=10_000, idle_timeout_s=1.0, total_timeout_s=1.5)
    status, _, body, took = await _call(mw, dict(SCOPE), trickle)
    assert status == 408 and "body_timeout_s" in body["error"]["message"]
    assert 1.4 <= took < 3.0, took


async def test_a_key_at_its_request_rate_is_refused_before_its_body_is_read(redis_url):
    import coe.serve.ingress as ingress

    store = RedisKeyStore(redis_url, f"slow-{uuid.uuid4().hex[:8]}")
    _, key = store.add("tenant-b", limits=KeyLimits(rpm=1))
    tenants = TenantLimiter(store.r, store.namespace)
    tenants.admit(key, 10)  # its one request of this minute
    ingress._RUNTIME["tenants"] = tenants
    reads = []

    async def receive():
        reads.append(1)
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def app(scope, receive, send):
        raise AssertionError("a refused request must not reach the app")

    try:
        mw = BodyLimitMiddleware(app, max_bytes=10_000, idle_timeout_s=10, total_timeout_s=30,
                                 before_body=ingress._rate_before_body)
        status, headers, body, took = await _call(mw, {**SCOPE, "coe.key": key.public()}, receive)
    finally:
        ingress._RUNTIME.pop("tenants", None)
    assert status == 429 and body["error"]["code"] == "key_rpm_limit" and int(headers[b"retry-after"]) >= 1
    assert not reads and took < 2.0  # not one byte of the body was waited for
