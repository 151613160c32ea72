"""Tier manager: DISK ⇄ DRAM ⇄ HBM with byte budgets, leases, shared loads and prefetch.

Invariants (checked on every reservation; ``peak_bytes`` records the worst seen, tests assert it):

* bytes in a tier never exceed its budget — space is *reserved* before a move starts, so two loads
  in flight cannot overshoot together;
* HBM-resident experts are also DRAM-resident (the pinned host copy is what HBM is refilled from;
  on CPU the "HBM" model is a view of that copy), so the DRAM budget counts them too;
* a leased expert (one generating) is never evicted; an acquire that needs its space waits;
* concurrent acquires of one expert share one load.

Policies decide the eviction order and whether to prefetch:

* ``lru`` — evict the least recently released expert; never prefetch;
* ``demand`` — evict the expert with the least queued demand (router/pool hints), LRU among
  equals; :meth:`TierManager.prefetch` moves the most demanded non-resident expert up as far as it
  can go without evicting anything leased or more demanded, while the current one keeps generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from coe.engines.base import Engine, SwapRecord, Tier
from coe.errors import ExpertLoadError, ExpertNotServed, ExpertTooLarge

log = logging.getLogger(__name__)

POLICIES = ("lru", "demand")


@dataclass
class _Entry:
    name: str
    engine: Engine
    size: int
    leases: int = 0
    last_used: float = 0.0
    reserved: set[Tier] = field(default_factory=set)  # tiers whose bytes are counted for it
    loading: asyncio.Future | None = None
    pinned: bool = False  # being removed/moved: not a victim candidate
    error: ExpertLoadError | None = None


@dataclass
class TierMetrics:
    """Plain counters; the serve layer exports them (Prometheus / Ray metrics)."""

    swaps: dict[str, int] = field(default_factory=dict)  # "dram->hbm": n
    bytes_moved: dict[str, int] = field(default_factory=dict)
    swap_seconds: dict[str, float] = field(default_factory=dict)
    last_swap_seconds: dict[str, float] = field(default_factory=dict)
    evictions: int = 0
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, expert, "dram->hbm start"/...)

    def record(self, name: str, rec: SwapRecord) -> None:
        if rec.src is rec.dst:
            return
        k = f"{rec.src.value}->{rec.dst.value}"
        self.swaps[k] = self.swaps.get(k, 0) + 1
        self.bytes_moved[k] = self.bytes_moved.get(k, 0) + rec.nbytes
        self.swap_seconds[k] = self.swap_seconds.get(k, 0.0) + rec.seconds
        self.last_swap_seconds[k] = rec.seconds

    def event(self, name: str, what: str) -> None:
        self.events.append((time.monotonic(), name, what))
        if len(self.events) > 10_000:
            del self.events[:5_000]


class TierManager:
    """Moves engines between tiers under per-tier byte budgets; see the module docstring."""

    def __init__(self, hbm_budget_bytes: int, dram_budget_bytes: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"unknown tier policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.budget = {Tier.HBM: int(hbm_budget_bytes), Tier.DRAM: int(dram_budget_bytes)}
        self.policy = policy
        self.used = {Tier.HBM: 0, Tier.DRAM: 0}
        self.peak_bytes = {Tier.HBM: 0, Tier.DRAM: 0}
        self.metrics = TierMetrics()
        self.demand: dict[str, int] = {}
        self._entries: dict[str, _Entry] = {}
        self._cond = asyncio.Condition()

    # ---------------------------------------------------------------- registration
    def register(self, name: str, engine: Engine, size_bytes: int) -> None:
        """Admit an expert; raises ExpertTooLarge now if it can never fit a budget."""
        for tier in (Tier.HBM, Tier.DRAM):
            if size_bytes > self.budget[tier]:
                raise ExpertTooLarge(
                    f"expert {name!r} needs {size_bytes / 1e9:.3f} GB but the {tier.name} budget of this "
                    f"pool is {self.budget[tier] / 1e9:.3f} GB"
                )
        self._entries[name] = _Entry(name, engine, int(size_bytes))

    async def unregister(self, name: str) -> None:
        """Wait for leases to end, then free both tiers and forget the expert."""
        e = self._entry(name)
        async with self._cond:
            e.pinned = True
            await self._cond.wait_for(lambda: e.leases == 0 and e.loading is None)
            await self._demote(e, Tier.DISK)
            del self._entries[name]
            self._cond.notify_all()

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ExpertNotServed(f"expert {name!r} is not in this pool") from None

    def tier_of(self, name: str) -> Tier:
        return self._entry(name).engine.tier

    def leases(self, name: str) -> int:
        return self._entry(name).leases

    def names(self) -> list[str]:
        return list(self._entries)

    # ---------------------------------------------------------------- accounting
    def _reserve_now(self, e: _Entry, tier: Tier) -> None:
        self.used[tier] += e.size
        e.reserved.add(tier)
        self.peak_bytes[tier] = max(self.peak_bytes[tier], self.used[tier])
        assert self.used[tier] <= self.budget[tier], f"{tier} budget exceeded"

    def _free(self, e: _Entry, tier: Tier) -> None:
        if tier in e.reserved:
            e.reserved.discard(tier)
            self.used[tier] -= e.size

    def _victims(self, tier: Tier, exclude: _Entry) -> list[_Entry]:
        """Evictable experts holding ``tier``, best victim first."""
        cands = [
            x for x in self._entries.values()
            if x is not exclude and tier in x.reserved and x.leases == 0 and x.loading is None and not x.pinned
        ]
        if self.policy == "demand":
            cands.sort(key=lambda x: (self.demand.get(x.name, 0), x.last_used))
        else:
            cands.sort(key=lambda x: x.last_used)
        return cands

    async def _demote(self, e: _Entry, to: Tier) -> None:
        """Move ``e`` down to ``to`` (caller holds the condition's lock; these moves are cheap)."""
        eng = e.engine
        if to.rank < Tier.HBM.rank and eng.tier is Tier.HBM:
            self.metrics.event(e.name, "hbm->dram start")
            self.metrics.record(e.name, await eng.to_dram())
            self._free(e, Tier.HBM)
        if to is Tier.DISK and eng.tier is Tier.DRAM:
            self.metrics.record(e.name, await eng.unload())
            self._free(e, Tier.DRAM)
        if to.rank < Tier.HBM.rank:
            self._free(e, Tier.HBM)
        if to is Tier.DISK:
            self._free(e, Tier.DRAM)

    async def _make_room(self, tier: Tier, e: _Entry, wait: bool, protect_demand: int | None = None) -> bool:
        """Reserve ``e.size`` bytes in ``tier`` for ``e``, evicting by policy; waits for leases if
        ``wait`` else gives up (returns False). ``protect_demand``: never evict an expert whose demand
        is ≥ this (prefetch must not push out what is about to be used)."""
        while True:
            if tier in e.reserved:
                return True
            if self.used[tier] + e.size <= self.budget[tier]:
                self._reserve_now(e, tier)
                return True
            need = self.used[tier] + e.size - self.budget[tier]
            victims = self._victims(tier, e)
            if protect_demand is not None:
                victims = [v for v in victims if self.demand.get(v.name, 0) < protect_demand]
            chosen, freed = [], 0
            for v in victims:
                if freed >= need:
                    break
                chosen.append(v)
                freed += v.size
            if freed >= need:
                for v in chosen:
                    self.metrics.evictions += 1
                    self.metrics.event(v.name, f"evict {tier.value}")
                    await self._demote(v, Tier.DRAM if tier is Tier.HBM else Tier.DISK)
                continue
            if not wait:
                return False
            await self._cond.wait()

    # ---------------------------------------------------------------- moving up
    async def _promote(self, e: _Entry, target: Tier, wait: bool = True, protect_demand: int | None = None) -> bool:
        """Bring ``e`` up to ``target``; concurrent callers share the in-flight move."""
        while True:
            if e.error is not None:
                raise e.error
            if e.engine.tier.rank >= target.rank:
                return True
            if e.loading is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(e.loading)
                continue
            fut = asyncio.get_running_loop().create_future()
            e.loading = fut
            try:
                ok = await self._promote_once(e, target, wait, protect_demand)
                fut.set_result(ok)
                if not ok:
                    return False
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters re-check e.error
                if isinstance(exc, ExpertLoadError):
                    e.error = exc
                raise
            finally:
                e.loading = None
                async with self._cond:
                    self._cond.notify_all()

    async def _promote_once(self, e: _Entry, target: Tier, wait: bool, protect_demand: int | None) -> bool:
        eng = e.engine
        if eng.tier is Tier.DISK:
            async with self._cond:
                if not await self._make_room(Tier.DRAM, e, wait, protect_demand):
                    return False
            self.metrics.event(e.name, "disk->dram start")
            try:
                self.metrics.record(e.name, await eng.load())
            except BaseException:
                async with self._cond:
                    self._free(e, Tier.DRAM)
                raise
            self.metrics.event(e.name, "disk->dram done")
        if target is Tier.HBM and eng.tier is Tier.DRAM:
            async with self._cond:
                if not await self._make_room(Tier.HBM, e, wait, protect_demand):
                    return False
            self.metrics.event(e.name, "dram->hbm start")
            try:
                self.metrics.record(e.name, await eng.to_hbm())
            except BaseException:
                async with self._cond:
                    self._free(e, Tier.HBM)
                raise
            self.metrics.event(e.name, "dram->hbm done")
        return True

    @contextlib.asynccontextmanager
    async def acquire(self, name: str) -> AsyncIterator[Engine]:
        """Make ``name`` HBM-resident and hold a lease (no eviction) for the duration."""
        e = self._entry(name)
        e.leases += 1  # counted before the load so the space it gets cannot be stolen
        try:
            await self._promote(e, Tier.HBM)
            e.last_used = time.monotonic()
            yield e.engine
        finally:
            e.leases -= 1
            e.last_used = time.monotonic()
            async with self._cond:
                self._cond.notify_all()

    async def demote(self, name: str, to: Tier = Tier.DRAM) -> None:
        """Evict ``name`` down to ``to`` now (waits for its leases); for operators and benches."""
        e = self._entry(name)
        async with self._cond:
            await self._cond.wait_for(lambda: e.leases == 0 and e.loading is None)
            self.metrics.evictions += 1
            await self._demote(e, to)
            self._cond.notify_all()

    # ---------------------------------------------------------------- policy hooks
    def hint_demand(self, demand: dict[str, int]) -> None:
        """Queued demand per expert (router hints + queue depths); used by the ``demand`` policy."""
        self.demand = {k: int(v) for k, v in demand.items() if k in self._entries}

    async def prefetch(self, name: str) -> Tier:
        """Best effort: move ``name`` up as far as budgets allow without waiting or evicting anything
        leased or at least as demanded. Returns the tier it reached. No-op under ``lru``."""
        e = self._entry(name)
        if self.policy != "demand" or e.pinned or e.error is not None:
            return e.engine.tier
        prot = self.demand.get(name, 0)
        try:
            if not await self._promote(e, Tier.HBM, wait=False, protect_demand=prot):
                await self._promote(e, Tier.DRAM, wait=False, protect_demand=prot)
        except ExpertLoadError:
            pass
        return e.engine.tier

    def error_of(self, name: str) -> ExpertLoadError | None:
        return self._entry(name).error

    def clear_error(self, name: str) -> None:
        self._entry(name).error = None

    def snapshot(self) -> dict:
        return {
            "budget_bytes": {t.value: b for t, b in self.budget.items()},
            "bytes": {t.value: b for t, b in self.used.items()},
            "peak_bytes": {t.value: b for t, b in self.peak_bytes.items()},
            "swaps": dict(self.metrics.swaps),
            "bytes_moved": dict(self.metrics.bytes_moved),
            "swap_seconds": dict(self.metrics.swap_seconds),
            "last_swap_seconds": dict(self.metrics.last_swap_seconds),
            "evictions": self.metrics.evictions,
        }
