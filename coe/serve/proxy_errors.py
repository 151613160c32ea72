"""Ray Serve's HTTP proxy answers in coe's error shape too.

Some answers on coe's port never reach coe's app, they come from Ray Serve's proxy itself, as
plain text:

* during start-up, between the proxy binding the port and receiving the app's route, every path
  gets ``404 Path '/healthz' not found. Ping http://.../-/routes …`` (sub-second, seen in one
  start of three); a probe or a client then reads "not found" from a service that is starting;
* when an ingress deployment's own queue is full (``max_queued_requests``) the proxy refuses with
  ``429 Request dropped due to backpressure`` (``backpressure_config``, with ``Retry-After``);
* a deployment that cannot take requests gives a 503, a proxy-side timeout a 408 and an
  unexpected proxy error a 500 whose text can hold a traceback.

Ray Serve lets an operator wrap its proxy in ASGI middlewares through the documented environment
variable ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (an import path to a function returning a
list of Starlette ``Middleware``): :func:`middlewares` is that function. It rewrites only error
answers (status >= 400) whose content type is ``text/plain``, which coe's app never sends (its
errors are JSON, streams are ``text/event-stream``, ``/metrics`` answers 200), into the OpenAI
error shape, keeping ``Retry-After``. A 404 while the proxy has no route yet becomes 503
``starting`` with ``Retry-After: 1``, except for the liveness probe ``/healthz``, which gets 200
``{"status": "starting"}`` (issue 31: liveness must not fail during a normal start; readiness,
``/readyz``, does); a 500's text is logged and replaced by a generic message.
The proxy's own ``/-/healthz`` and ``/-/routes`` (KubeRay probes them) are left as Ray answers them.

``coe.ray_local.init_local_ray`` sets the variable (``coe serve`` and the test suite), the KubeRay
manifest sets it in the pods' environment.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

ENV_PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "coe.serve.proxy_errors:middlewares"

log = logging.getLogger("coe.serve.proxy")

#: status -> (OpenAI error type, code) for answers the proxy makes itself
_KINDS: dict[int, tuple[str, str]] = {
    404: ("invalid_request_error", "not_found"),
    408: ("invalid_request_error", "request_timeout"),
    429: ("rate_limit_error", "overloaded"),
    503: ("server_error", "unavailable"),
}


def _error(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


#: the app's liveness probe (``GET /healthz`` after the route prefix)
LIVENESS = "healthz"


def is_liveness(path: str) -> bool:
    """Whether ``path`` is the app's liveness probe under any route prefix (the proxy does not know
    the app's prefix before its route is in)."""
    return path.rstrip("/").rsplit("/", 1)[-1] == LIVENESS


def rewrite(status: int, text: str, path: str, routes_ready: bool) -> tuple[int, bytes, bool]:
    """``(status, JSON body, add Retry-After: 1)`` for a plain-text error of the proxy."""
    if status == 404 and not routes_ready and is_liveness(path):
        # alive, starting: a liveness probe must not fail (and restart the pod) during a normal
        # start; readiness (/readyz) says 503 until the app is warm
        return 200, json.dumps({"status": "starting", "detail": "coe is starting: Ray Serve's proxy is up, the "
                                "app's routes are not served yet; /readyz says when it is ready"}).encode(), False
    if status == 404 and not routes_ready:
        return 503, _error("coe is starting: the app's routes are not served yet; retry in a moment",
                           "server_error", "starting"), True
    if status == 404:
        return 404, _error(f"nothing is served at '{path}' (the proxy's route table: GET /-/routes)",
                           *_KINDS[404]), False
    if status == 429:
        return 429, _error("coe is at capacity (too many requests queued at the ingress); retry later",
                           *_KINDS[429]), False
    if status == 503:
        return 503, _error("coe cannot take requests right now (its ingress is restarting or not deployed); "
                           "retry", *_KINDS[503]), True
    if status == 408:
        return 408, _error("the request took longer than the proxy's request_timeout_s", *_KINDS[408]), False
    log.warning("Ray Serve proxy error %s for %s: %s", status, path, text[:2000])
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return status, _error("the service's HTTP proxy failed to handle the request (the server log has the "
                          "details)", type_, "proxy_error"), False


class ProxyErrorsAsJSON:
    """Pure ASGI middleware around Ray Serve's HTTP proxy (see the module docstring)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def _routes_ready(self) -> bool:
        """Whether the proxy has a route table with a route in it: asks the proxy's own
        ``GET /-/routes`` (answered inside the proxy: 503 before the first route table)."""
        got: dict[str, Any] = {"status": 0, "body": b""}

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                got["status"] = msg["status"]
            elif msg["type"] == "http.response.body":
                got["body"] += msg.get("body", b"")

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/-/routes", "raw_path": b"/-/routes", "root_path": "",
                 "query_string": b"", "headers": [], "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
        try:
            await self.app(scope, receive, send)
            return got["status"] == 200 and json.loads(got["body"] or b"{}") != {}
        except Exception:  # noqa: BLE001 - cannot tell: call it starting, the client retries
            return False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http" or scope.get("path", "").startswith("/-/"):
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def send_json_errors(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = msg.get("headers") or []
                ctype = next((bytes(v) for k, v in headers if bytes(k).lower() == b"content-type"), b"")
                if msg.get("status", 200) >= 400 and ctype.startswith(b"text/plain"):
                    held["start"], held["body"] = msg, b""  # rewritten once the body is complete
                    return
                return await send(msg)
            if msg["type"] == "http.response.body" and "start" in held:
                held["body"] += msg.get("body", b"")
                if msg.get("more_body"):
                    return
                start = held.pop("start")
                status, body, retry = rewrite(start["status"], held["body"].decode(errors="replace"),
                                              scope.get("path", ""),
                                              await self._routes_ready() if start["status"] == 404 else True)
                headers = [(bytes(k), bytes(v)) for k, v in start.get("headers") or []
                           if bytes(k).lower() not in (b"content-type", b"content-length")]
                if retry and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", b"1"))
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                return await send({"type": "http.response.body", "body": body})
            return await send(msg)

        return await self.app(scope, receive, send_json_errors)


def middlewares() -> list:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` points at: the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrorsAsJSON)]
