"""Issue 24 items 6 and 7 on the real service (Ray Serve, Redis, tiny experts), with keys on:

* 6: conversation affinity was shared across tenants: B's request with A's ``X-Coe-Session`` (or
  A's opening) was pinned to A's expert, and ``/v1/route`` answered "sticky" only for openings
  another tenant had really sent, so it revealed them. Affinity is now keyed by the API key.
* 7: ``/v1/route`` had no per-key limits and ignored a key's ``--experts`` scope (a 5-rpm key made
  753 calls in 20 s). It now applies the key's scope and request rate, as chat does.
* low: ``/metrics`` showed every key's name to any key; and without a key the probes said what
  is inside."""

from __future__ import annotations

import uuid

import httpx
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(300)
HELLO = [{"role": "user", "content": "Write one line about the sea."}]


def test_route_keeps_to_a_key_s_scope_rate_and_own_conversations(serve_app, http):
    from coe.keys import KeyLimits, RedisKeyStore

    reg = serve_app.registry
    store = RedisKeyStore(reg.url, reg.namespace)
    tag = uuid.uuid4().hex[:6]
    names = {n: f"rt-{n}-{tag}" for n in ("a", "b", "scoped", "slow", "admin")}
    admin, _ = store.add(names["admin"], role="admin")
    a, _ = store.add(names["a"])
    b, _ = store.add(names["b"])
    scoped, _ = store.add(names["scoped"], limits=KeyLimits(experts=["tiny-b"]))
    slow, _ = store.add(names["slow"], limits=KeyLimits(rpm=2))
    try:
        wait_until(lambda: http.get("/v1/models").status_code == 401, 15, every=0.2, what="auth to switch on")

        def post(key: str, path: str, body: dict, session: str | None = None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}", **({"X-Coe-Session": session} if session else {})}
            return http.post(path, json=body, headers=headers)

        # without a key the probes say up/ready and nothing of what is inside; with one, the details
        assert set(http.get("/healthz").json()) == {"status"} and set(http.get("/readyz").json()) == {"status"}
        assert "keys" in http.get("/healthz", headers={"Authorization": f"Bearer {a}"}).json()
        # 7: the scope: a key limited to tiny-b is routed to tiny-b only, and may not name tiny-a
        r = post(scoped, "/v1/route", {"model": "coe", "messages": HELLO})
        assert r.status_code == 200 and r.json()["coe"]["expert"] == "tiny-b", r.text
        assert post(scoped, "/v1/route", {"model": "tiny-a", "messages": HELLO}).status_code == 403
        # 7: the rate: the third call of a 2-rpm key within the minute is refused
        codes = [post(slow, "/v1/route", {"model": "coe", "messages": HELLO}).status_code for _ in range(3)]
        assert codes[:2] == [200, 200] and codes[2] == 429, codes
        # 6: A's session pins A's conversation; B with the same session id is a new conversation
        session = f"shared-{tag}"
        r = post(a, "/v1/chat/completions", {"model": "coe", "messages": HELLO, "max_tokens": 1}, session)
        assert r.status_code == 200, r.text
        mine = post(a, "/v1/route", {"model": "coe", "messages": HELLO}, session).json()["coe"]
        theirs = post(b, "/v1/route", {"model": "coe", "messages": HELLO}, session).json()["coe"]
        assert mine["conversation"] == "sticky" and theirs["conversation"] != "sticky", (mine, theirs)
        # /metrics: a user key sees its own per-key series, not which other tenants exist; admin all
        def metrics(key: str) -> str:
            return http.get("/metrics", headers={"Authorization": f"Bearer {key}"}).text

        assert f'key="{names["a"]}"' in metrics(a) and f'key="{names["a"]}"' not in metrics(b)
        assert f'key="{names["a"]}"' in metrics(admin)
    finally:
        for name in names.values():
            store.remove(name)
        wait_until(lambda: http.get("/v1/models").status_code == 200, 15, every=0.2, what="auth to switch off")
