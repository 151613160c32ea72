"""Issue 31 item 6: while the app deploys, Ray Serve's proxy answers before coe's route is in; a
liveness probe (`/healthz`, under any route prefix) then gets 200 "starting", every other path 503
"starting" with Retry-After, readiness included (coe/serve/proxy_errors.py). The whole start-up,
polled on a real `coe serve`, is in tests/security/test_drain.py and tests/cli/test_terminal.py."""

from __future__ import annotations

import json

from coe.serve.proxy_errors import rewrite

NOT_FOUND = "Path '/healthz' not found. Ping http://.../-/routes for available routes."


def test_liveness_is_alive_while_the_route_is_not_in():
    for path in ("/healthz", "/api/healthz", "/healthz/"):
        status, body, retry = rewrite(404, NOT_FOUND, path, routes_ready=False)
        assert status == 200 and not retry and json.loads(body)["status"] == "starting", path


def test_readiness_and_the_api_wait_while_the_route_is_not_in():
    for path in ("/readyz", "/v1/models", "/healthz-not", "/v1/chat/completions"):
        status, body, retry = rewrite(404, NOT_FOUND, path, routes_ready=False)
        assert status == 503 and retry and json.loads(body)["error"]["code"] == "starting", path


def test_once_routes_are_in_an_unknown_path_is_not_found():
    status, body, _ = rewrite(404, NOT_FOUND, "/x/healthz", routes_ready=True)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
