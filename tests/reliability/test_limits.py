"""Body limit / encoding middleware, Retry-After arithmetic and the per-request deadline, without Ray."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request

from coe.limits import BodyLimitMiddleware, RequestTimeout, retry_after_s, with_deadline


def _app(limit: int) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request):
        body = await request.json()
        return {"n": len(body.get("text", ""))}

    app.add_middleware(BodyLimitMiddleware, max_bytes=limit)
    return app


async def _post(app, content: bytes, headers=None):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.post("/v1/echo", content=content, headers=headers or {"content-type": "application/json"})


async def test_body_over_limit_is_413_openai_shaped():
    app = _app(1000)
    ok = await _post(app, b'{"text": "' + b"a" * 900 + b'"}')
    assert ok.status_code == 200 and ok.json() == {"n": 900}
    r = await _post(app, b'{"text": "' + b"a" * 2000 + b'"}')
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and "1000" in r.json()["error"]["message"]


async def test_streamed_body_without_length_is_counted():
    app = _app(1000)

    async def gen():
        for _ in range(10):
            yield b"a" * 500

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/echo", content=gen(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_non_utf8_body_is_400():
    r = await _post(_app(1000), b'{"text": "\xff\xfe caf\xe9"}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_encoding"


def test_retry_after_grows_with_queue_and_is_clamped():
    assert retry_after_s(0) == 1
    assert retry_after_s(64, 8, 2.0) == 16
    assert retry_after_s(10_000, 8, 2.0, hi=30) == 30
    assert retry_after_s(64, 8, 2.0) > retry_after_s(8, 8, 2.0)


async def test_deadline_closes_the_stream():
    closed = asyncio.Event()

    async def slow():
        try:
            yield 1
            await asyncio.sleep(10)
            yield 2
        finally:
            closed.set()

    got = []
    with pytest.raises(RequestTimeout) as e:
        async for x in with_deadline(slow(), 0.3):
            got.append(x)
    assert got == [1] and e.value.started and closed.is_set()

    async def never():
        await asyncio.sleep(10)
        yield 0

    with pytest.raises(RequestTimeout) as e:
        async for _ in with_deadline(never(), 10, first_item_timeout_s=0.2):
            pass
    assert not e.value.started
