"""Every response carries a request id (decision 7 of DESIGN.md): ``x-request-id``.

Ray Serve's proxy already does this: it keeps a client's ``X-Request-Id`` or makes one, passes it
in the request headers and echoes it on the response; the id is then used as it is. Without the
proxy (the app alone, tests) a fresh id is made and added here. The id is in
``scope["coe.request_id"]`` for the handlers: chat completions use it as their body ``id``
(``chatcmpl-<id>``), as vLLM does.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
HEADER = b"x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(request: Request) -> str:
    """The id the middleware gave this request (a fresh one outside the middleware, e.g. in tests)."""
    rid = request.scope.get("coe.request_id")
    if not rid:
        rid = request.scope["coe.request_id"] = new_request_id()
    return rid


class RequestIdMiddleware:
    """Pure ASGI: sets ``scope["coe.request_id"]`` and adds ``x-request-id`` to every response,
    error responses of the middlewares inside it included."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == HEADER), "")
        rid = given if _SAFE.fullmatch(given) else new_request_id()
        scope["coe.request_id"] = rid
        if rid == given:  # Ray Serve's proxy put it there (the client's or its own) and echoes it itself
            return await self.app(scope, receive, send)

        async def send_with_id(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", ()) if k.lower() != HEADER]
                msg = {**msg, "headers": [*headers, (HEADER, rid.encode())]}
            await send(msg)

        return await self.app(scope, receive, send_with_id)
