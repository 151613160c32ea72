"""Small helpers shared by the security replays (they all run against the session's real service)."""

from __future__ import annotations

import httpx
from conftest import wait_until

HELLO = [{"role": "user", "content": "What is 2+2?"}]


def err(r: httpx.Response) -> dict:
    """The OpenAI error object of a response (and a check that it has exactly that shape)."""
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


wait = wait_until
