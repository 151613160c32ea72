"""Small helpers shared by the security replays (they all run against the session's real service)."""

from __future__ import annotations

import time

import httpx
import pytest

HELLO = [{"role": "user", "content": "What is 2+2?"}]


def err(r: httpx.Response) -> dict:
    """The OpenAI error object of a response (and a check that it has exactly that shape)."""
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def wait(cond, timeout: float, every: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as e:
            last = e
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
