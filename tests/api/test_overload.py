"""Overload refusals come before routing: the ingress's own gate in front of the router, and Ray
Serve's proxy when the ingress itself is full. Two extra ingress apps on the session's router and pool."""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterator

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)

HELLO = [{"role": "user", "content": "Write two lines about the sea, please."}]


@pytest.fixture(scope="module")
def small_ingresses(serve_app, redis_url) -> Iterator[dict[str, str]]:
    """``/gate``: at most one request waits for the router. ``/full``: the ingress takes one request
    at a time and Serve queues none (its proxy answers 429 for the rest)."""
    from ray import serve

    from coe.config import ServeConfig
    from coe.serve.ingress import Ingress

    cfg = ServeConfig(host="127.0.0.1", redis_url=redis_url, namespace=serve_app.registry.namespace,
                      registry_poll_s=2.0, limits={"max_routing_waiters": 1})
    conf = cfg.model_dump(mode="json")
    router = serve.get_deployment_handle("Router", app_name="coe")
    pool = serve.get_deployment_handle("ExpertPool", app_name="coe")
    serve.run(Ingress.options(name="GateIngress").bind(conf, router, pool), name="coe-gate", route_prefix="/gate",
              blocking=False)
    serve.run(Ingress.options(name="FullIngress", max_ongoing_requests=1, max_queued_requests=0,
                              backpressure_config={"status_code": 429, "retry_after_s": 1}).bind(conf, router, pool),
              name="coe-full", route_prefix="/full", blocking=False)
    bases = {k: f"{serve_app.base}/{k}" for k in ("gate", "full")}
    deadline = time.monotonic() + 180
    for base in bases.values():
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{base} did not come up"
            time.sleep(0.5)
    try:
        yield bases
    finally:
        serve.delete("coe-gate")
        serve.delete("coe-full")


def _burst(url: str, n: int, **body) -> list[tuple[int, float, httpx.Response]]:
    def one(_):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json={"model": "coe", "messages": HELLO, **body}, timeout=120)
        return r.status_code, time.perf_counter() - t0, r

    with cf.ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


def test_requests_beyond_the_router_capacity_are_refused_at_once(small_ingresses):
    out = _burst(small_ingresses["gate"], 12, max_tokens=1)
    refused = [(t, r) for s, t, r in out if s == 429]
    assert any(s == 200 for s, _, _ in out)
    assert refused, [s for s, _, _ in out]
    for took, r in refused:
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        assert took < 1.5  # no wait in front of the router


def test_the_ray_proxy_refuses_when_the_ingress_is_full(small_ingresses):
    out = _burst(small_ingresses["full"], 6, max_tokens=4)
    codes = [s for s, _, _ in out]
    assert 200 in codes and 429 in codes, codes
    for s, took, r in out:
        if s == 429:
            assert r.headers.get("retry-after") == "1" and took < 1.5
