"""Finding 2 of issue 12: under a route prefix, auth, the body limit and the UTF-8 check were skipped.

The middlewares tested ``scope["path"].startswith("/v1/")`` while Ray Serve keeps the prefix in the
path, so with ``route_prefix: /api`` every route answered without a key. These replays mount a second
ingress under ``/api`` (bound to the session app's router and pool) and check both mounts: with keys
on, every route needs a key except the probes; ``/metrics`` and the API docs included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from security_helpers import HELLO, err, wait

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def api_prefix(serve_app, redis_url) -> Iterator[str]:
    """``<base>/api``: the real Ingress deployed as a second Serve app with ``route_prefix="/api"``."""
    from ray import serve

    from coe.config import ServeConfig
    from coe.serve.ingress import Ingress

    cfg = ServeConfig(host="127.0.0.1", redis_url=redis_url, namespace=serve_app.registry.namespace,
                      registry_poll_s=2.0)
    router = serve.get_deployment_handle("Router", app_name="coe")
    pool = serve.get_deployment_handle("ExpertPool", app_name="coe")
    serve.run(Ingress.bind(cfg.model_dump(mode="json"), router, pool), name="coe-api", route_prefix="/api",
              blocking=False)
    base = serve_app.base + "/api"
    wait(lambda: httpx.get(base + "/healthz", timeout=5).status_code == 200, 120, what="the /api ingress")
    try:
        yield base
    finally:
        serve.delete("coe-api")


@pytest.fixture
def a_key(serve_app, http) -> Iterator[str]:
    """Keys on (one user key, `coe keys add`, in the registry's Redis) for the duration of a test."""
    reg = serve_app.registry
    env = {**os.environ, "COE_REDIS_URL": reg.url, "COE_NAMESPACE": reg.namespace}
    coe = [sys.executable, "-m", "coe.cli", "keys"]
    out = subprocess.run([*coe, "add", "sec-test"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = re.search(r"coe-[A-Za-z0-9_-]{40,}", out.stdout).group(0)
    try:
        wait(lambda: http.get("/v1/models").status_code == 401, 15, what="auth to switch on")
        yield key
    finally:
        subprocess.run([*coe, "remove", "sec-test"], env=env, capture_output=True, text=True, timeout=60)
        wait(lambda: http.get("/v1/models").status_code == 200, 15, what="auth to switch off")


PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/route"),
             ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"),
             ("GET", "/no-such-route"), ("GET", "//v1/models"), ("GET", "/v1/../metrics")]


@pytest.mark.parametrize("mount", ["/", "/api"])
def test_every_route_but_the_probes_needs_a_key(serve_app, api_prefix, a_key, mount):
    base = serve_app.base if mount == "/" else api_prefix
    with httpx.Client(base_url=base, timeout=60) as c:
        for method, path in PROTECTED:
            body = {"model": "tiny-a", "messages": HELLO, "max_tokens": 1} if method == "POST" else None
            r = c.request(method, path, json=body)
            assert r.status_code == 401, (mount, path, r.status_code, r.text[:200])
            assert err(r)["code"] == "missing_api_key"  # none sent; a wrong one is "invalid_api_key"
        assert c.get("/healthz").status_code == 200  # liveness stays open for probes
        auth = {"Authorization": f"Bearer {a_key}"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        r = c.get("/metrics", headers=auth)  # Prometheus scrapes with a key (docs/security.md)
        assert r.status_code == 200 and "coe_" in r.text
        assert c.get("/openapi.json", headers=auth).status_code == 200
        r = c.post("/v1/chat/completions", headers=auth, json={"model": "tiny-a", "messages": HELLO, "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_limits_hold_under_a_prefix(api_prefix):
    """No key configured: the body limit and the encoding checks still apply under /api."""
    with httpx.Client(base_url=api_prefix, timeout=60) as c:
        big = {"model": "tiny-a", "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=big)
        assert r.status_code == 413 and err(r)["code"] == "request_too_large", r.text[:200]
        assert time.monotonic() - t0 < 10
        r = c.post("/v1/chat/completions", content=b'{"model":"tiny-a","messages":[{"role":"user","content":"\xff"}]}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and err(r)["code"] == "invalid_encoding"
        r = c.post("/v1/chat/completions", content=b'{"model":"tiny-a","messages":[{"role":"user","content":"\\udfff"}]}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and err(r)["code"] == "invalid_encoding"
        r = c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HELLO, "max_tokens": 1})
        assert r.status_code == 200, r.text
