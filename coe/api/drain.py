"""Graceful shutdown at the HTTP edge: refuse new work, let in-flight requests finish, cut what is
left at a deadline with an error the client can read.

Why here and not only Ray Serve's own ``graceful_shutdown_timeout_s``: Ray waits for a replica's
ongoing requests, but while it waits its proxy answers new requests with a plain-text error, and a
stream still running when the time is up is cut mid-body (no error event, no ``[DONE]``), which an
OpenAI client reads as a broken connection. The ingress therefore drains itself first
(:class:`DrainState`, started by ``coe serve`` on SIGTERM/SIGINT or by ``coe drain``):

* :class:`DrainMiddleware` answers every new request except the probes with 503
  ``shutting_down`` (OpenAI error shape, ``Retry-After``) and counts the requests in flight;
* ``/readyz`` turns 503 at once, so a load balancer stops sending;
* streams and non-streamed requests still running at the deadline are cut through
  :func:`until_cut`: a stream ends with an SSE error event and ``data: [DONE]``, a request whose
  answer has not started gets the 503 as its body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from coe.api.errors import APIError
from coe.api.protocol import error_payload

_T = TypeVar("_T")

#: requests that are answered while draining: liveness and readiness (readiness says "draining")
PROBE_PATHS: frozenset[str] = frozenset({"/healthz", "/livez", "/readyz"})
#: after the cut, how long the cut requests get to write their error event and [DONE]
CUT_GRACE_S = 5.0


def shutting_down(retry_after_s: int) -> APIError:
    """The refusal (and the cut) every client sees while the service stops."""
    return APIError(503, "coe is shutting down and takes no new requests; retry (a load balancer sends the "
                         "retry to another instance)", "server_error", None, "shutting_down",
                    max(1, retry_after_s))


@dataclass
class DrainState:
    """One ingress replica's drain: off until :meth:`start`; the cut event fires at the deadline."""

    retry_after_s: int = 1
    draining: bool = False
    started_at: float | None = None
    deadline: float | None = None
    in_flight: int = 0
    cut_requests: int = 0
    _cut: asyncio.Event | None = field(default=None, repr=False)
    _idle: asyncio.Event | None = field(default=None, repr=False)

    # events are created lazily: the replica's event loop is not running when the state is built
    @property
    def cut(self) -> asyncio.Event:
        if self._cut is None:
            self._cut = asyncio.Event()
        return self._cut

    @property
    def idle(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
        return self._idle

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self.idle.set()

    def status(self) -> dict[str, Any]:
        left = None if self.deadline is None else max(0.0, round(self.deadline - time.monotonic(), 1))
        return {"draining": self.draining, "in_flight": self.in_flight, "cut": self.cut.is_set(),
                "cut_requests": self.cut_requests, "seconds_left": left}

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Refuse new requests from now on; wait up to ``timeout_s`` for the ones in flight, then
        cut them and give them :data:`CUT_GRACE_S` to write their error. Idempotent: a second call
        (another signal, a preStop hook after coe's own) waits on the same deadline."""
        if not self.draining:
            self.draining = True
            self.started_at = time.monotonic()
            self.deadline = self.started_at + max(0.0, timeout_s)
        at_start = self.in_flight
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), max(0.0, self.deadline - time.monotonic()))
        if self.in_flight:
            self.cut_requests = max(self.cut_requests, self.in_flight)
            self.cut.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), CUT_GRACE_S)
        return {**self.status(), "in_flight_at_start": at_start,
                "drained_in_s": round(time.monotonic() - (self.started_at or time.monotonic()), 2)}


async def until_cut(stream: AsyncIterator[_T], state: DrainState) -> AsyncIterator[_T]:
    """``stream``'s items until the drain deadline cuts it (then :func:`shutting_down` is raised,
    and the stream is closed, which stops the generation behind it). Outside a drain the items
    pass with no extra task; during one each wait races the cut."""
    it = stream.__aiter__()
    try:
        while True:
            if state.cut.is_set():
                raise shutting_down(state.retry_after_s)
            if not state.draining:
                try:
                    item = await it.__anext__()
                except StopAsyncIteration:
                    return
                yield item
                continue
            nxt = asyncio.ensure_future(it.__anext__())
            cut = asyncio.ensure_future(state.cut.wait())
            try:
                await asyncio.wait({nxt, cut}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # cut, or this request cancelled (client gone): stop the pending read too
                cut.cancel()
                if not nxt.done():
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
            if nxt.cancelled():
                raise shutting_down(state.retry_after_s)
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class DrainMiddleware:
    """Pure ASGI: counts the requests in flight and, while draining, answers every new one except
    the probes with 503 ``shutting_down``. ``state`` is a callable because the replica builds its
    state after this module's app was created."""

    def __init__(self, app: Any, state: Callable[[], DrainState], route_path: Callable[[dict], str]):
        self.app = app
        self.state = state
        self.route_path = route_path

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.route_path(scope) in PROBE_PATHS:
            return await self.app(scope, receive, send)
        st = self.state()
        if st.draining:
            err = shutting_down(st.retry_after_s)
            body = json.dumps(error_payload(err.message, err.type, err.param, err.code)).encode()
            await send({"type": "http.response.start", "status": err.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"retry-after", str(err.retry_after).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        st.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            st.leave()
