"""Overload refusals come before routing: the ingress's own gate in front of the router (an extra
ingress app on the session's router and pool, allowing one request to wait for the router), and
Ray Serve's own queue limit in front of the ingress (``max_queued_requests``), whose refusal the
proxy makes: it reaches the client in the OpenAI error shape (coe/serve/proxy_errors.py)."""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import wait_until

pytestmark = pytest.mark.timeout(300)

HELLO = [{"role": "user", "content": "Write two lines about the sea, please."}]


@pytest.fixture(scope="module")
def small_ingresses(serve_app, redis_url) -> Iterator[dict[str, str]]:
    """``/gate``: at most one request waits for the router. ``/queue``: the ingress takes one
    request at a time and Serve queues one more in front of it; beyond, Serve's proxy refuses."""
    from ray import serve

    from coe.config import ServeConfig
    from coe.serve.ingress import Ingress

    cfg = ServeConfig(host="127.0.0.1", redis_url=redis_url, namespace=serve_app.registry.namespace,
                      registry_poll_s=2.0, limits={"max_routing_waiters": 1})
    conf = cfg.model_dump(mode="json")
    router = serve.get_deployment_handle("Router", app_name="coe")
    pool = serve.get_deployment_handle("ExpertPool", app_name="coe")
    try:
        serve.run(Ingress.options(name="GateIngress").bind(conf, router, pool), name="coe-gate",
                  route_prefix="/gate", blocking=False)
        serve.run(Ingress.options(name="QueueIngress", max_ongoing_requests=1, max_queued_requests=1,
                                  ray_actor_options={"num_cpus": 0.05},  # the session Ray has 2 CPUs
                                  backpressure_config={"status_code": 429, "retry_after_s": 3})
                  .bind(conf, router, pool), name="coe-queue", route_prefix="/queue", blocking=False)
        bases = {"gate": f"{serve_app.base}/gate", "queue": f"{serve_app.base}/queue"}
        for base in bases.values():
            wait_until(lambda: httpx.get(base + "/healthz", timeout=5).status_code == 200, 180, every=0.5,
                       what=f"{base} to come up")
        yield bases
    finally:
        for name in ("coe-gate", "coe-queue"):
            try:
                serve.delete(name)
            except Exception:  # never deployed
                pass


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


def test_serves_own_queue_limit_answers_in_the_openai_shape(small_ingresses):
    """Requests beyond the ingress's queue are refused by Ray Serve's proxy before coe sees them:
    the client still gets an OpenAI error (429, ``overloaded``) with Retry-After, not Ray's text."""
    out = _burst(small_ingresses["queue"], 10, max_tokens=8, ignore_eos=True)
    assert any(s == 200 for s, _, _ in out), [s for s, _, _ in out]
    refused = [r for s, _, r in out if s == 429]
    assert refused, [s for s, _, _ in out]
    for r in refused:
        assert r.headers["content-type"].startswith("application/json"), r.text
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] == "overloaded" and body["error"]["type"] == "rate_limit_error"
        assert int(r.headers["retry-after"]) == 3  # the deployment's backpressure_config
