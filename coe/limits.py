"""Request limits shared by the ingress and the pool: body size, timeouts, backpressure hints.

* :class:`RequestLimits` — the knobs (config section ``limits``; env overrides for the byte limit).
* :class:`BodyLimitMiddleware` — pure ASGI: a body over ``max_request_bytes`` gets 413 before any
  parsing (Content-Length checked first, streamed bodies counted), a body that is not UTF-8 gets 400
  (JSON is UTF-8, RFC 8259); both OpenAI-shaped, so neither can become a 5xx deeper down.
* :func:`retry_after_s` — how long a client refused with 429 should wait, from the queue it hit.
* :func:`with_deadline` — iterate a generation stream under a per-request deadline; on expiry the
  stream is closed (which cancels the generation and frees its slot) and :class:`RequestTimeout` raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

ENV_MAX_REQUEST_BYTES = "COE_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: ~250k tokens of text, far beyond any expert's context
_T = TypeVar("_T")


def default_max_request_bytes() -> int:
    raw = os.environ.get(ENV_MAX_REQUEST_BYTES, "").strip()
    try:
        return max(1, int(raw)) if raw else DEFAULT_MAX_REQUEST_BYTES
    except ValueError:
        return DEFAULT_MAX_REQUEST_BYTES


class RequestLimits(BaseModel):
    """Per-request limits of the HTTP API (``limits:`` in the service config)."""

    model_config = ConfigDict(extra="forbid")

    max_request_bytes: int = Field(default_factory=default_max_request_bytes, ge=1,
                                   description="bodies larger than this get 413 (env COE_MAX_REQUEST_BYTES)")
    request_timeout_s: float = Field(
        300.0, gt=0, description="whole request: routing, queueing, loading, generation; a client may ask for "
                                 "less with the X-Coe-Timeout header (seconds)")
    max_queued_requests: int = Field(
        512, ge=-1, description="requests waiting in front of the ingress (Ray Serve); beyond: 429; -1 = no bound")
    body_idle_timeout_s: float = Field(
        10.0, gt=0, description="a client that sends nothing of its body for this long gets 408 (slow-client "
                                "defence; nginx's client_body_timeout is the same idea)")
    body_timeout_s: float = Field(
        30.0, gt=0, description="the whole body must arrive within this, however it trickles (a byte every few "
                                "seconds never trips the idle timeout); past it: 408")
    max_routing_waiters: int | None = Field(
        None, ge=1, description="requests one ingress replica lets wait for the router; beyond: 429 at once, "
                                "before any routing work (None = the router's capacity: its replicas x "
                                "max(64, 4 x max_batch_size))")
    retry_after_min_s: int = Field(1, ge=0)
    retry_after_max_s: int = Field(30, ge=1)
    loading_wait_s: float = Field(
        120.0, ge=0, description="a request that names an expert whose engine is still starting (after "
                                 "`coe-registry add`) waits this long for it, then gets 503 + Retry-After; a "
                                 "client may ask for another wait with the X-Coe-Wait-Timeout header (seconds)")
    loading_wait_max_s: float = Field(
        600.0, ge=0, description="the longest wait X-Coe-Wait-Timeout may ask for")


# ------------------------------------------------------------------------------------- errors
class RequestTimeout(Exception):
    """The per-request deadline passed; ``started`` tells whether any output had been produced."""

    def __init__(self, timeout_s: float, started: bool):
        super().__init__(f"the request did not finish within {timeout_s:g} s (limits.request_timeout_s "
                         "or X-Coe-Timeout)")
        self.timeout_s = timeout_s
        self.started = started


def openai_error(message: str, code: str, type: str = "invalid_request_error", param: str | None = None) -> dict:
    from coe.api.protocol import error_payload

    return error_payload(message, type, param, code)


# ------------------------------------------------------------------------------------- backpressure
def retry_after_s(queue_depth: int = 0, max_batch_size: int = 8, avg_request_s: float = 2.0,
                  lo: int = 1, hi: int = 30) -> int:
    """Seconds until a refused request is likely to find room: the batches ahead of it times the
    typical request time, rounded up and clamped to ``[lo, hi]`` (``Retry-After`` is whole seconds)."""
    batches = max(queue_depth, 0) / max(max_batch_size, 1)
    return int(min(max(math.ceil(batches * max(avg_request_s, 0.0)), lo), hi))


class LatencyEWMA:
    """An exponentially weighted mean of request durations (input of :func:`retry_after_s`)."""

    def __init__(self, initial_s: float = 2.0, alpha: float = 0.1):
        self.value = initial_s
        self.alpha = alpha

    def observe(self, seconds: float) -> None:
        self.value += self.alpha * (seconds - self.value)


# ------------------------------------------------------------------------------------- deadlines
async def with_deadline(stream: AsyncIterator[_T], timeout_s: float, first_item_timeout_s: float | None = None,
                        on_close: Callable[[], Any] | None = None,
                        cancel: Callable[[], Any] | None = None,
                        limit_s: float | None = None) -> AsyncIterator[_T]:
    """Yield ``stream``'s items until it ends or the deadline passes (then close it and raise
    :class:`RequestTimeout`). ``first_item_timeout_s`` bounds the wait for the first item separately.
    On any early exit (deadline, error, the consumer cancelled) ``cancel`` (default: ``stream.cancel``
    if it has one, e.g. a Ray Serve response generator) stops the work behind the stream.
    ``limit_s`` is the limit the client or operator set, for the error message, when ``timeout_s``
    is only what was left of it (a user who set 1 s should read "1 s", not "0.771852 s")."""
    deadline = time.monotonic() + timeout_s
    shown = limit_s if limit_s is not None else timeout_s
    started = False
    try:
        while True:
            left = deadline - time.monotonic()
            if not started and first_item_timeout_s is not None:
                left = min(left, first_item_timeout_s)
            if left <= 0:
                raise RequestTimeout(shown if started else (first_item_timeout_s or shown), started)
            try:  # asyncio.timeout, not wait_for: no extra task per item (every token passes here)
                async with asyncio.timeout(left):
                    item = await stream.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise RequestTimeout(shown if started or first_item_timeout_s is None
                                     else min(shown, first_item_timeout_s), started) from None
            started = True
            yield item
    except BaseException:
        # timeout, client gone (CancelledError), or an error: stop the generation behind the stream.
        # A Ray Serve response generator has cancel(); a plain async generator has aclose().
        stop = cancel or getattr(stream, "cancel", None)
        if callable(stop):
            with contextlib.suppress(Exception):
                stop()
        raise
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):  # closing a broken stream must not mask the real error
                await aclose()
        if on_close is not None:
            on_close()


def request_timeout(limits: RequestLimits, header: str | None) -> float:
    """The deadline of one request: the server's ``request_timeout_s``, or less if the client asked
    for less with ``X-Coe-Timeout`` (never more; junk values are ignored)."""
    try:
        asked = float(header) if header else None
    except ValueError:
        asked = None
    if asked is None or not math.isfinite(asked) or asked <= 0:
        return limits.request_timeout_s
    return min(asked, limits.request_timeout_s)


def loading_wait(limits: RequestLimits, header: str | None) -> float:
    """How long a request waits for an expert whose engine is still starting: the server's
    ``loading_wait_s``, or what the client asked with ``X-Coe-Wait-Timeout`` (0 = do not wait),
    capped by ``loading_wait_max_s``; junk values are ignored."""
    try:
        asked = float(header) if header else None
    except ValueError:
        asked = None
    if asked is None or not math.isfinite(asked) or asked < 0:
        return min(limits.loading_wait_s, limits.loading_wait_max_s)
    return min(asked, limits.loading_wait_max_s)


# ------------------------------------------------------------------------------------- text checks
# a JSON \u escape in the surrogate range; only bodies holding one are parsed here
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _first_unencodable(obj: Any, where: str) -> str | None:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _first_unencodable(v, f"{where}[{i}]")
            if found is not None:
                return found
    elif isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{where}.{k}" if where else str(k)
            found = _first_unencodable(k, sub)
            if found is None:
                found = _first_unencodable(v, sub)
            if found is not None:
                return found
    return None


def unencodable_text(body: bytes) -> str | None:
    """The JSON path (``messages[0].content``; ``""`` for the top level) of the first string in
    ``body`` that is not valid Unicode (a lone surrogate such as ``"\\udfff"``), else ``None``.

    Valid UTF-8 bytes can still spell such a string through a JSON escape, and it breaks tokenizers
    deep inside the pool; refusing it here keeps it from ever reaching an expert (issue 12, item 1).
    Bodies without a surrogate escape are not parsed (the common case costs one regex scan); a body
    that is not JSON is left for the app to report."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _first_unencodable(doc, "")


# ------------------------------------------------------------------------------------- body limit
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def _reply(send: Callable, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads a request body up to ``max_bytes`` before the app sees it, then replays it.

    413 ``request_too_large`` for a larger body (declared or actual), 400 ``invalid_encoding`` for
    a body that is not UTF-8 or spells a lone surrogate. Every ``POST``/``PUT``/``PATCH`` body, on
    every route, whatever prefix the app is mounted under (deny by default, issue 12 item 2)."""

    def __init__(self, app: Any, max_bytes: int | Callable[[], int] | None = None,
                 idle_timeout_s: float | Callable[[], float] = 10.0,
                 total_timeout_s: float | Callable[[], float] = 30.0,
                 before_body: Callable[[dict], Any] | None = None):
        """``before_body(scope)``: an awaitable check made before the body is read (the key's
        request rate, issue 24 item 9): ``(status, payload, headers)`` refuses the request, None
        lets it read its body. Whoever is over a limit cannot hold an ingress slot with a slow body."""
        self.app = app
        self._max_bytes = max_bytes or default_max_request_bytes()
        self._idle = idle_timeout_s
        self._total = total_timeout_s
        self._before_body = before_body

    @property
    def max_bytes(self) -> int:
        """The limit now (a callable lets the service set it from its config after import)."""
        return int(self._max_bytes() if callable(self._max_bytes) else self._max_bytes)

    def _too_large(self, got: str) -> dict:
        return openai_error(f"request body is {got} bytes; the limit is {self.max_bytes} bytes "
                            f"(limits.max_request_bytes)", "request_too_large")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await _reply(send, 400, openai_error("invalid Content-Length header", "invalid_request"))
            if n > limit:
                return await _reply(send, 413, self._too_large(str(n)))
        if self._before_body is not None:
            refused = await self._before_body(scope)
            if refused is not None:
                return await _reply(send, *refused)
        chunks: list[bytes] = []
        size = 0
        idle = float(self._idle() if callable(self._idle) else self._idle)
        total = float(self._total() if callable(self._total) else self._total)
        deadline = time.monotonic() + total
        while True:
            wait = min(idle, deadline - time.monotonic())
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, wait))
            except asyncio.TimeoutError:  # a slow (or stalled) client must not hold a slot forever
                why = (f"nothing arrived for {idle:g} s (limits.body_idle_timeout_s)" if wait >= idle else
                       f"it did not arrive whole within {total:g} s (limits.body_timeout_s)")
                return await _reply(send, 408, openai_error(f"the request body stalled: {why}", "request_timeout"),
                                    [(b"connection", b"close")])
            if msg["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _reply(send, 413, self._too_large(f"more than {limit}"))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _reply(send, 400, openai_error(
                f"request body is not valid UTF-8 (byte {e.start}): JSON bodies must be UTF-8", "invalid_encoding"))
        where = unencodable_text(body)
        if where is not None:
            return await _reply(send, 400, openai_error(
                f"{where or 'the body'} holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair): "
                "such text cannot be encoded as UTF-8", "invalid_encoding", param=where or None))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for disconnect, as the server would

        return await self.app(scope, replay, send)
