"""Follow one Redis pub/sub channel from a thread, reconnecting while Redis is away.

Why one place: the registry watcher and the feedback watcher both need the same loop (subscribe,
wake the owner on each message, wake it once more after every (re)subscribe so changes made while
unsubscribed are not missed, back off while Redis is down). The delay schedule is redis-py's own
:class:`redis.backoff.ExponentialBackoff` (0.5 s doubling to 30 s), not a hand-written one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable

log = logging.getLogger("coe.serve")


def follow_channel(redis_url: str, channel: str, stop: threading.Event, on_message: Callable[[str | None], None],
                   what: str, on_lost: Callable[[], None] | None = None) -> None:
    """Blocking: call ``on_message(data)`` for every message on ``channel`` until ``stop`` is set;
    ``on_message(None)`` right after each (re)subscribe; ``on_lost()`` when the connection breaks.
    ``what`` names the subscription in the log."""
    import redis
    from redis.backoff import ExponentialBackoff

    backoff = ExponentialBackoff(cap=30.0, base=0.5)
    failures = 0
    while not stop.is_set():
        client = None
        try:
            client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, decode_responses=True)
            ps = client.pubsub(ignore_subscribe_messages=True)
            ps.subscribe(channel)
            failures = 0
            on_message(None)  # changes made while we were not subscribed
            while not stop.is_set():
                msg = ps.get_message(timeout=1.0)
                if msg is not None:
                    on_message(str(msg.get("data") or ""))
            ps.close()
        except Exception as e:  # noqa: BLE001 - Redis away: back off and subscribe again
            if on_lost is not None:
                on_lost()
            delay = backoff.compute(failures)
            failures += 1
            log.warning("%s subscription on %s lost (%s); retrying in %.1f s", what, channel, e, delay)
            stop.wait(delay)
        finally:
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing a broken connection must not raise
                    pass


class ChannelFollower:
    """What the registry and feedback watchers share: read everything once, then follow a channel
    from a thread (:func:`follow_channel`) while a task on the event loop reacts and polls.

    Subclasses set ``redis_url``, ``channel``, ``what`` and implement :meth:`_first_read`,
    :meth:`_on_message` (called on the listener thread; sets ``_wake`` on the loop) and :meth:`_on_wake`."""

    redis_url: str
    channel: str
    what: str
    poll_s: float
    _wake: asyncio.Event

    def _init_follower(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._follow_task: asyncio.Task | None = None

    async def start(self) -> None:
        """Read everything, then follow changes; idempotent."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        await self._first_read()
        threading.Thread(target=self._listen, name=f"coe-{self.what}-sub", daemon=True).start()
        self._follow_task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        self._stop.set()
        if self._follow_task:
            self._follow_task.cancel()

    def _listen(self) -> None:
        follow_channel(self.redis_url, self.channel, self._stop, self._on_message, self.what, self._on_lost)

    def _on_lost(self) -> None:
        """The subscription broke (listener thread); by default nothing beyond the log line."""

    async def _first_read(self) -> None:
        raise NotImplementedError

    def _on_message(self, data: str | None) -> None:
        raise NotImplementedError

    async def _follow(self) -> None:
        """Wake on a message (``self._wake``, set from :meth:`_on_message`) or every ``poll_s``
        (the safety net for a message missed while unsubscribed), then :meth:`_on_wake`."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self._on_wake()

    async def _on_wake(self) -> None:
        raise NotImplementedError
