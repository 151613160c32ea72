"""Keep a router replica's copy of the feedback records fresh, like the registry watcher does for
experts: a pub/sub message per change (the request id) for speed, the version counter as a safety
net, and a full re-read when the two disagree (a message lost while Redis restarted).

``on_change(records)`` runs on the replica's event loop after each batch of changes (messages that
arrive together are coalesced into one call), so the router is rebuilt once per burst of feedback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from coe.feedback import FeedbackConfig, FeedbackRecord, FeedbackStore

from coe.serve.pubsub_follow import ChannelFollower

log = logging.getLogger("coe.serve.feedback")

OnRecords = Callable[[dict[str, FeedbackRecord]], Awaitable[None] | None]
FULL_RELOAD_S = 600.0  # also re-read everything this often: records trimmed by the cap leave no message


class FeedbackWatcher(ChannelFollower):
    """Holds ``records`` (request id → :class:`FeedbackRecord`) and calls ``on_change`` on changes."""

    def __init__(self, redis_url: str, namespace: str, config: FeedbackConfig, poll_s: float = 5.0,
                 on_change: OnRecords | None = None):
        self.store = FeedbackStore(redis_url, namespace, config)
        self.redis_url = redis_url
        self.poll_s = poll_s
        self.on_change = on_change
        self.records: dict[str, FeedbackRecord] = {}
        self.version = -1
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._last_full = 0.0
        self.channel, self.what = self.store.channel, "feedback"
        self._init_follower()

    async def _first_read(self) -> None:
        await self._sync(full=True)

    async def _on_wake(self) -> None:
        await asyncio.sleep(0.05)  # coalesce a burst of messages into one rebuild
        await self._sync(full=time.monotonic() - self._last_full > FULL_RELOAD_S)

    async def _sync(self, full: bool = False) -> None:
        pending, self._pending = self._pending, set()  # swapped on the loop, where ids are added
        try:
            changed = await asyncio.to_thread(self._read, full, pending)
        except Exception as e:  # Redis away: keep the records we have, try again at the next poll
            log.warning("feedback records could not be read (%s); keeping %d", e, len(self.records))
            return
        if changed and self.on_change is not None:
            try:
                res = self.on_change(dict(self.records))
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("feedback change handler failed")

    def _read(self, full: bool, pending: set[str]) -> bool:
        """Apply pending request ids (one HGET each) or re-read everything; True when changed."""
        ver = self.store.version()
        if not full and ver == self.version and not pending:
            return False
        if not full and pending and ver <= self.version + len(pending):
            for rid in pending:
                rec = self.store.record(rid)
                if rec is None:
                    self.records.pop(rid, None)
                else:
                    self.records[rid] = rec
            self.version = ver
            return True
        self.version, self.records = self.store.records()
        self._last_full = time.monotonic()
        return True

    def _on_message(self, rid: str | None) -> None:
        self._kick(rid)

    def _kick(self, rid: str | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def wake() -> None:
            if rid:
                self._pending.add(rid)
            self._wake.set()

        loop.call_soon_threadsafe(wake)
