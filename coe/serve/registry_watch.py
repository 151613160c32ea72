"""Keep an in-process copy of the registry fresh: pub/sub for speed, a version poll as safety net.

Every message on the registry's channel (``coe:{namespace}:events``) triggers a re-read of the
snapshot; so does a change of ``version()`` seen by the periodic poll (a message lost while Redis
restarted, say). Subscribers get ``(old, new)`` snapshots and derive what changed by diffing, so
a missed message can never leave an expert half-added or half-removed here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from coe.serve.pubsub_follow import ChannelFollower

if TYPE_CHECKING:
    from expert_registry.spec import Expert

log = logging.getLogger("coe.serve.registry")

OnChange = Callable[[Any, Any], Awaitable[None] | None]


def events_channel(namespace: str) -> str:
    """The registry's pub/sub channel (see CONTRACTS.md)."""
    return f"coe:{namespace}:events"


@dataclass
class SnapshotDiff:
    """What changed between two registry snapshots."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    map_changed: bool = False


def diff_snapshots(old: Any | None, new: Any) -> SnapshotDiff:
    """Experts added/removed/updated (spec changed) and whether the category map changed."""
    old_experts = dict(old.experts) if old is not None else {}
    d = SnapshotDiff()
    for name, spec in new.experts.items():
        if name not in old_experts:
            d.added.append(name)
        elif _spec_key(old_experts[name]) != _spec_key(spec):
            d.updated.append(name)
    d.removed = [n for n in old_experts if n not in new.experts]
    d.map_changed = old is None or dict(old.category_map) != dict(new.category_map)
    return d


def _spec_key(expert: Expert) -> dict[str, Any]:
    """The parts of a spec that matter for serving it (timestamps and status excluded)."""
    return expert.model_dump(exclude={"created_at", "updated_at", "status", "status_reason"})


class RegistryWatcher(ChannelFollower):
    """Holds ``snapshot`` (a ``RegistrySnapshot``) and calls ``on_change(old, new)`` on changes."""

    def __init__(self, redis_url: str, namespace: str = "default", poll_s: float = 5.0,
                 on_change: OnChange | None = None):
        from expert_registry.store import RedisRegistry

        self.redis_url = redis_url
        self.namespace = namespace
        self.poll_s = poll_s
        self.registry = RedisRegistry(redis_url, namespace=namespace)
        self.snapshot: Any = None
        self._callbacks: list[OnChange] = [on_change] if on_change else []
        self.channel, self.what = events_channel(namespace), "registry"
        self._init_follower()
        self._refresh_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # health: is Redis answering? (``/healthz`` reports "degraded" while it is not)
        self.reachable = True
        self.last_error: str | None = None
        self.last_ok: float | None = None
        self.down_since: float | None = None
        self.invalid: dict[str, str] = {}  # unreadable registry entries (skipped), name -> reason

    async def _first_read(self) -> None:
        await self.refresh()

    async def _on_wake(self) -> None:
        await self.refresh()

    async def refresh(self) -> bool:
        """Re-read the snapshot if the version moved; returns whether it changed."""
        async with self._refresh_lock:
            try:
                new = await asyncio.to_thread(self.registry.snapshot)
            except Exception as e:  # Redis briefly away: keep serving the last snapshot
                if self.reachable:
                    log.warning("registry snapshot failed (%s); serving registry version %s until Redis is back",
                                e, getattr(self.snapshot, "version", None))
                self.reachable, self.last_error = False, str(e)
                self.down_since = self.down_since or time.time()
                return False
            if not self.reachable:
                log.warning("registry reachable again after %.0f s", time.time() - (self.down_since or time.time()))
            self.reachable, self.last_error, self.down_since, self.last_ok = True, None, None, time.time()
            invalid = dict(getattr(new, "invalid", {}) or {})
            if invalid != self.invalid and invalid:
                log.warning("registry: skipping %d unreadable entr%s: %s", len(invalid),
                            "y" if len(invalid) == 1 else "ies", "; ".join(invalid.values()))
            self.invalid = invalid  # read on every poll: a raw write to Redis does not bump the version
            old = self.snapshot
            if old is not None and new.version == old.version:
                return False
            self.snapshot = new
            for cb in self._callbacks:
                try:
                    res = cb(old, new)
                    if asyncio.iscoroutine(res):
                        await res
                except Exception:
                    log.exception("registry change handler failed")
            return True

    def health(self) -> dict:
        """What ``/healthz`` shows about the registry connection."""
        from coe.security import redact

        return {"reachable": self.reachable, "error": redact(self.last_error) if self.last_error else None,
                "down_for_s": round(time.time() - self.down_since, 1) if self.down_since else None,
                "snapshot_version": getattr(self.snapshot, "version", None),
                "invalid_entries": dict(self.invalid)}

    def _on_message(self, _data: str | None) -> None:
        self._kick()

    def _on_lost(self) -> None:
        self._kick()  # refresh() records the outage for /healthz now, not at the next poll

    def _kick(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)
