"""Every response carries a request id (decision 7 of DESIGN.md): ``x-request-id``.

Pure ASGI, outermost, so even a 401 or a 413 from another middleware carries it. A client's own
``x-request-id`` is kept when it is a short token (so a caller can correlate), otherwise a fresh
one is made. Error bodies name it instead of a traceback; the log line of a 500 carries it too."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

HEADER = b"x-request-id"
SCOPE_KEY = "coe.request_id"
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def request_id(scope: dict) -> str:
    """The id of the request in ``scope`` (set by :class:`RequestIdMiddleware`; made up if absent)."""
    rid = scope.get(SCOPE_KEY)
    if rid is None:
        rid = scope[SCOPE_KEY] = f"req-{uuid.uuid4().hex[:24]}"
    return rid


class RequestIdMiddleware:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers", ()) if k == HEADER), None)
        if given is not None and _CLIENT_ID.fullmatch(given):
            scope[SCOPE_KEY] = given.decode()
        rid = request_id(scope).encode()

        async def send_with_id(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", ()) if k.lower() != HEADER]
                msg = {**msg, "headers": [*headers, (HEADER, rid)]}
            await send(msg)

        return await self.app(scope, receive, send_with_id)
