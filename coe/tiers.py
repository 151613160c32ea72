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
from typing import AsyncIterator, Awaitable, Callable

from coe.engines.base import Engine, SwapRecord, Tier
from coe.engines.memory import EngineMemory, is_out_of_memory
from coe.errors import ExpertLoadError, ExpertNotServed, ExpertTooLarge, ExpertTransientError

log = logging.getLogger(__name__)

POLICIES = ("lru", "demand")


_START_PHASES = ("starting engine", "reading weights")  # an engine start (DISK->DRAM) in flight


@dataclass(eq=False)
class _Entry:
    name: str
    engine: Engine
    mem: EngineMemory
    fixed: bool = False  # memory given at register(): never re-read from the engine
    charge: dict[Tier, int] = field(default_factory=lambda: {Tier.HBM: 0, Tier.DRAM: 0})  # bytes counted for it
    leases: int = 0
    last_used: float = 0.0
    loading: asyncio.Future | None = None
    pinned: bool = False  # being removed/moved: not a victim candidate
    error: ExpertLoadError | None = None  # permanent: files missing or corrupt
    transient: ExpertTransientError | None = None  # the latest passing failure (OOM, timeout)
    attempts: int = 0  # transient failures in a row
    retry_at: float = 0.0  # monotonic time before which a new attempt is refused
    phase: str = ""  # what a move in flight is doing ("starting engine", "waiting for memory", ...)

    @property
    def size(self) -> int:
        """HBM bytes while awake (what the scheduler packs sessions by)."""
        return self.mem.active_bytes


SwapObserver = Callable[[str, SwapRecord], None]


@dataclass
class TierMetrics:
    """Plain counters, per src->dst and per expert; observers see each move where it happens."""

    swaps: dict[str, int] = field(default_factory=dict)  # "dram->hbm": n
    bytes_moved: dict[str, int] = field(default_factory=dict)
    swap_seconds: dict[str, float] = field(default_factory=dict)
    last_swap_seconds: dict[str, float] = field(default_factory=dict)
    expert_swaps: dict[str, dict[str, int]] = field(default_factory=dict)  # expert -> "dram->hbm" -> n
    expert_swap_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    evictions: int = 0
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, expert, "dram->hbm start"/...)
    observers: list[SwapObserver] = field(default_factory=list)

    def record(self, name: str, rec: SwapRecord) -> None:
        if rec.src is rec.dst:
            return
        k = f"{rec.src.value}->{rec.dst.value}"
        self.swaps[k] = self.swaps.get(k, 0) + 1
        self.bytes_moved[k] = self.bytes_moved.get(k, 0) + rec.nbytes
        self.swap_seconds[k] = self.swap_seconds.get(k, 0.0) + rec.seconds
        self.last_swap_seconds[k] = rec.seconds
        per = self.expert_swaps.setdefault(name, {})
        per[k] = per.get(k, 0) + 1
        secs = self.expert_swap_seconds.setdefault(name, {})
        secs[k] = secs.get(k, 0.0) + rec.seconds
        for obs in self.observers:
            try:
                obs(name, rec)
            except Exception:  # noqa: BLE001 - a metrics sink must not break a swap
                log.debug("swap observer failed", exc_info=True)

    def event(self, name: str, what: str) -> None:
        self.events.append((time.monotonic(), name, what))
        if len(self.events) > 10_000:
            del self.events[:5_000]


class TierManager:
    """Moves engines between tiers under per-tier byte budgets; see the module docstring."""

    def __init__(self, hbm_budget_bytes: int, dram_budget_bytes: int, policy: str = "lru", *,
                 load_timeout_s: float | None = None, wake_timeout_s: float | None = None,
                 retry_backoff_s: float = 1.0, retry_backoff_max_s: float = 60.0,
                 memory_wait_s: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown tier policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.budget = {Tier.HBM: int(hbm_budget_bytes), Tier.DRAM: int(dram_budget_bytes)}
        self.policy = policy
        self.used = {Tier.HBM: 0, Tier.DRAM: 0}
        self.peak_bytes = {Tier.HBM: 0, Tier.DRAM: 0}
        self.metrics = TierMetrics()
        self.demand: dict[str, int] = {}
        self.load_timeout_s = load_timeout_s
        self.wake_timeout_s = wake_timeout_s
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        #: longest a move waits for room held by leases (requests generating): then a transient error
        self.memory_wait_s = memory_wait_s
        #: expert -> seconds each engine start is held before it reads anything (a slow disk, for
        #: tests of what a user sees while a start takes long; counted in ``load_timeout_s``)
        self.start_delay_s: dict[str, float] = {}
        self._entries: dict[str, _Entry] = {}
        self._cond = asyncio.Condition()
        # One engine starts on the device at a time: vLLM profiles free memory while it starts, and
        # the footprint measured around a start is only that engine's when nothing else starts.
        self._device_start = asyncio.Lock()
        #: device moves begun so far (wakes, sleeps, shut-downs, starts): a start that sees this change
        #: while it measures its engine tells the engine (``Engine.measurement_disturbed``)
        self._device_moves = 0

    # ---------------------------------------------------------------- registration
    def register(self, name: str, engine: Engine, size_bytes: int | None = None) -> None:
        """Admit an expert; raises ExpertTooLarge now if it can never fit a budget. Without
        ``size_bytes`` the engine's :meth:`~coe.engines.base.Engine.memory` is charged (an
        estimate, corrected once the engine has measured itself)."""
        fixed = size_bytes is not None
        mem = EngineMemory.weights_only(int(size_bytes), True) if fixed else engine.memory()
        self._check_fits(name, mem)
        self._entries[name] = _Entry(name, engine, mem, fixed=fixed)

    def _check_fits(self, name: str, mem: EngineMemory) -> None:
        for tier, need in ((Tier.HBM, max(mem.active_bytes, mem.load_bytes)), (Tier.DRAM, mem.host_bytes)):
            if need > self.budget[tier]:
                raise ExpertTooLarge(
                    f"expert {name!r} needs {need / 1e9:.3f} GB but the {tier.name} budget of this "
                    f"pool is {self.budget[tier] / 1e9:.3f} GB"
                )

    async def unregister(self, name: str) -> None:
        """Wait for leases to end, then free both tiers and forget the expert."""
        e = self._entry(name)
        async with self._cond:
            e.pinned = True
            await self._cond.wait_for(lambda: e.leases == 0 and e.loading is None)
            await self._demote(e, Tier.DISK)
            self._set(e, Tier.HBM, 0)
            self._set(e, Tier.DRAM, 0)
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

    def memory_of(self, name: str) -> EngineMemory:
        return self._entry(name).mem

    def moving(self, name: str) -> bool:
        """Whether a move of ``name`` (a start, a wake, a prefetch) is in flight."""
        return self._entry(name).loading is not None

    def charged(self, name: str) -> dict[Tier, int]:
        """Bytes counted for ``name`` per tier now."""
        return dict(self._entry(name).charge)

    def phase_of(self, name: str) -> str:
        """What a move in flight is doing; during an engine start, the engine's own step
        (``Engine.load_phase``: "reading weights", "copying weights to host", ...) when it says one."""
        e = self._entry(name)
        if e.phase in _START_PHASES:
            return getattr(e.engine, "load_phase", "") or e.phase
        return e.phase

    # ---------------------------------------------------------------- accounting
    def _set(self, e: _Entry, tier: Tier, nbytes: int) -> None:
        """Charge ``nbytes`` of ``tier`` to ``e`` (callers made room for an increase)."""
        self.used[tier] += int(nbytes) - e.charge[tier]
        e.charge[tier] = int(nbytes)
        self.peak_bytes[tier] = max(self.peak_bytes[tier], self.used[tier])

    def _state_charge(self, e: _Entry) -> dict[Tier, int]:
        """What an engine in its current tier holds: the rule the budgets are kept by."""
        tier = e.engine.tier
        if tier is Tier.DISK:
            return {Tier.HBM: 0, Tier.DRAM: 0}
        hbm = e.mem.active_bytes if tier is Tier.HBM else e.mem.idle_bytes
        return {Tier.HBM: hbm, Tier.DRAM: e.mem.host_bytes}

    def _settle(self, e: _Entry) -> None:
        """Re-read the engine's (now measured) memory and charge what its tier holds. A measured
        footprint above the estimate is charged as it is (the bytes are on the device); the next
        reservation evicts to get back under the budget, and ``peak_bytes`` shows the overshoot."""
        if not e.fixed:
            mem = e.engine.memory()
            if mem.measured and mem != e.mem:
                log.info("expert %s: measured %.2f GB awake, %.2f GB asleep (estimated %.2f / %.2f)", e.name,
                         mem.active_bytes / 1e9, mem.idle_bytes / 1e9, e.mem.active_bytes / 1e9, e.mem.idle_bytes / 1e9)
                e.mem = mem
        for tier, n in self._state_charge(e).items():
            self._set(e, tier, n)

    def _freed_by(self, v: _Entry, tier: Tier) -> tuple[int, Tier]:
        """Bytes of ``tier`` demoting ``v`` one step frees, and the tier it goes to."""
        if tier is Tier.HBM and v.engine.tier is Tier.HBM:
            return v.charge[Tier.HBM] - v.mem.idle_bytes, Tier.DRAM
        return v.charge[tier], Tier.DISK

    def _choose(self, victims: list[_Entry], tier: Tier, need: int) -> tuple[dict[_Entry, Tier], int]:
        """Victims (and how far down each goes) freeing ``need`` bytes of ``tier``: one step down
        for each in policy order first (an awake engine goes to sleep), then, if that is not
        enough, sleeping engines are shut down too (their context leaves the device)."""
        steps = [(v, *self._freed_by(v, tier)) for v in victims]
        if tier is Tier.HBM:
            steps += [(v, v.mem.idle_bytes, Tier.DISK) for v in victims if v.engine.tier is Tier.HBM]
        chosen: dict[_Entry, Tier] = {}
        freed = 0
        for v, gain, to in steps:
            if freed >= need:
                break
            if gain > 0:
                chosen[v] = to
                freed += gain
        return chosen, freed

    def _victims(self, tier: Tier, exclude: _Entry) -> list[_Entry]:
        """Evictable experts holding ``tier``, best victim first (for HBM: awake experts before
        sleeping ones, whose only HBM is their context and which would need a cold start)."""
        cands = [
            x for x in self._entries.values()
            if x is not exclude and x.charge[tier] > 0 and x.leases == 0 and x.loading is None and not x.pinned
        ]
        awake_first = (lambda x: 0 if x.engine.tier is Tier.HBM else 1) if tier is Tier.HBM else (lambda x: 0)
        if self.policy == "demand":
            cands.sort(key=lambda x: (awake_first(x), self.demand.get(x.name, 0), x.last_used))
        else:
            cands.sort(key=lambda x: (awake_first(x), x.last_used))
        return cands

    async def _demote(self, e: _Entry, to: Tier) -> None:
        """Move ``e`` down to ``to`` (caller holds the condition's lock; these moves are cheap)."""
        eng = e.engine
        if eng.tier is not Tier.DISK and e.charge[Tier.HBM]:
            self._device_moves += 1
        try:
            if to.rank < Tier.HBM.rank and eng.tier is Tier.HBM:
                self.metrics.event(e.name, "hbm->dram start")
                self.metrics.record(e.name, await self._timed(eng.to_dram(), self.wake_timeout_s, "going to sleep"))
            if to is Tier.DISK and eng.tier is Tier.DRAM:
                self.metrics.record(e.name, await self._timed(eng.unload(), self.wake_timeout_s, "stopping"))
        except asyncio.TimeoutError as exc:  # the lock is held: a move that never ends would stop every other
            await self._stop_wedged(e, str(exc))
        self._settle(e)

    async def _stop_wedged(self, e: _Entry, why: str) -> None:
        """Stop an engine whose move did not end in time (decision 10: no wait without bound):
        its memory is freed by stopping its process, and its next request starts it again."""
        log.error("expert %s: %s; stopping its engine (it starts again on its next request)", e.name, why)
        self.metrics.event(e.name, f"stopped: {why}")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(e.engine.close(), 60.0)

    async def _make_room(self, tier: Tier, e: _Entry, nbytes: int, wait: bool,
                         protect_demand: int | None = None) -> bool:
        """Charge ``nbytes`` of ``tier`` to ``e`` (replacing its current charge there), evicting by
        policy; waits for leases if ``wait`` else gives up (returns False). ``protect_demand``: never
        evict an expert whose demand is ≥ this (prefetch must not push out what is about to be used)."""
        if nbytes > self.budget[tier]:
            raise ExpertTooLarge(f"expert {e.name!r} needs {nbytes / 1e9:.3f} GB (measured) but the {tier.name} "
                                 f"budget of this pool is {self.budget[tier] / 1e9:.3f} GB")
        deadline = time.monotonic() + self.memory_wait_s if wait and self.memory_wait_s else None
        while True:
            if e.charge[tier] >= nbytes:
                return True
            need = self.used[tier] - e.charge[tier] + nbytes - self.budget[tier]
            if need <= 0:
                self._set(e, tier, nbytes)
                return True
            victims = self._victims(tier, e)
            if protect_demand is not None:
                victims = [v for v in victims if self.demand.get(v.name, 0) < protect_demand]
            chosen, freed = self._choose(victims, tier, need)
            if freed >= need:
                for v, to in chosen.items():
                    self.metrics.evictions += 1
                    self.metrics.event(v.name, f"evict {tier.value}")
                    await self._demote(v, to)
                continue
            if not wait:
                return False
            e.phase = "waiting for memory"
            try:
                await asyncio.wait_for(self._cond.wait(), None if deadline is None else max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                held = ", ".join(f"{x.name} {x.charge[tier] / 1e9:.2f} GB" for x in self._entries.values()
                                 if x is not e and x.charge[tier] and (x.leases or x.loading is not None or x.pinned))
                raise ExpertTransientError(
                    e.name, f"waited {self.memory_wait_s:g} s for {need / 1e9:.2f} GB more {tier.name} "
                    f"(memory_wait_s); held by work in progress: {held or 'nothing'}") from None

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
                if e.transient is not None and time.monotonic() < e.retry_at:
                    raise self._backing_off(e)
                continue
            if e.transient is not None and time.monotonic() < e.retry_at:
                raise self._backing_off(e)
            fut = asyncio.get_running_loop().create_future()
            e.loading = fut
            try:
                ok = await self._promote_once(e, target, wait, protect_demand)
                fut.set_result(ok)
                if ok:
                    e.transient, e.attempts = None, 0
                else:
                    return False
            except BaseException as exc:
                exc = self._classify(e, exc)
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters re-check e.error / e.transient
                if isinstance(exc, ExpertLoadError):
                    e.error = exc
                elif isinstance(exc, ExpertTransientError):
                    e.attempts += 1
                    delay = min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (e.attempts - 1))
                    e.retry_at = time.monotonic() + delay
                    e.transient = exc
                    exc.retry_after_s = delay
                    log.warning("%s; retrying in %.1f s (attempt %d)", exc, delay, e.attempts)
                raise exc
            finally:
                e.loading = None
                e.phase = ""
                async with self._cond:
                    self._cond.notify_all()

    def _classify(self, e: _Entry, exc: BaseException) -> BaseException:
        """Decision 2: out of memory and timeouts pass (retried); missing/corrupt files do not."""
        if isinstance(exc, (ExpertLoadError, ExpertTransientError)) or not isinstance(exc, Exception):
            return exc
        if isinstance(exc, asyncio.TimeoutError):
            return ExpertTransientError(e.name, f"{e.phase or 'moving'} timed out")
        if is_out_of_memory(exc):
            return ExpertTransientError(e.name, f"{type(exc).__name__}: {exc}".splitlines()[0][:400])
        return exc

    def _backing_off(self, e: _Entry) -> ExpertTransientError:
        assert e.transient is not None
        left = max(0.0, e.retry_at - time.monotonic())
        return ExpertTransientError(e.name, f"{e.transient.reason} (retrying in {left:.1f} s)", left)

    async def _timed(self, aw: Awaitable[SwapRecord], timeout_s: float | None, what: str) -> SwapRecord:
        try:
            return await asyncio.wait_for(aw, timeout_s) if timeout_s else await aw
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError(f"{what} took longer than {timeout_s} s") from None

    async def _load(self, e: _Entry, wait: bool, protect_demand: int | None) -> bool:
        """DISK→DRAM. Reserves the host copy and, for an engine that starts on the device (vLLM),
        its whole footprint there; after the start both are corrected to what was measured."""
        eng = e.engine
        mem = e.mem if e.fixed else eng.memory()
        e.mem = mem
        async with contextlib.AsyncExitStack() as stack:
            if mem.load_bytes:
                e.phase = "waiting for the device"
                await stack.enter_async_context(self._device_start)
            async with self._cond:
                if not await self._make_room(Tier.DRAM, e, mem.host_bytes, wait, protect_demand):
                    return False
                if mem.load_bytes and not await self._make_room(Tier.HBM, e, mem.load_bytes, wait, protect_demand):
                    self._settle(e)
                    return False
            e.phase = "starting engine" if mem.load_bytes else "reading weights"
            self.metrics.event(e.name, "disk->dram start")
            if mem.load_bytes:
                self._device_moves += 1
            moves = self._device_moves
            try:
                self.metrics.record(e.name, await self._timed(self._start(e), self.load_timeout_s, "loading"))
                if mem.load_bytes and self._device_moves != moves:
                    eng.measurement_disturbed()
            except BaseException:
                with contextlib.suppress(Exception):
                    await eng.unload()  # a half-started engine (a timeout) must not keep memory
                async with self._cond:
                    self._settle(e)
                raise
            async with self._cond:
                self._settle(e)
            self.metrics.event(e.name, "disk->dram done")
        return True

    async def _start(self, e: _Entry) -> SwapRecord:
        delay = self.start_delay_s.get(e.name, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        return await e.engine.load()

    async def _wake(self, e: _Entry, wait: bool, protect_demand: int | None) -> bool:
        """DRAM→HBM: reserve the whole awake footprint first, then move."""
        eng = e.engine
        async with self._cond:
            if not await self._make_room(Tier.HBM, e, e.mem.active_bytes, wait, protect_demand):
                return False
        e.phase = "waking"
        self._device_moves += 1
        self.metrics.event(e.name, "dram->hbm start")
        try:
            self.metrics.record(e.name, await self._timed(eng.to_hbm(), self.wake_timeout_s, "waking"))
        except asyncio.TimeoutError as exc:  # a wake still running in the engine: stop it, not half-woken
            await self._stop_wedged(e, str(exc))
            raise
        finally:
            async with self._cond:
                self._settle(e)
        self.metrics.event(e.name, "dram->hbm done")
        return True

    async def _promote_once(self, e: _Entry, target: Tier, wait: bool, protect_demand: int | None) -> bool:
        if e.engine.tier is Tier.DISK and not await self._load(e, wait, protect_demand):
            return False
        if target is Tier.HBM and e.engine.tier is Tier.DRAM:
            return await self._wake(e, wait, protect_demand)
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

    async def prefetch(self, name: str, *, hinted: bool = False) -> Tier:
        """Best effort: move ``name`` up as far as budgets allow without waiting or evicting anything
        leased or at least as demanded. Returns the tier it reached. No-op under ``lru``, unless
        ``hinted`` (the router says a request for it is on its way): then it runs under any policy
        and evicts only experts with no demand at all (nothing queued, running or routed)."""
        e = self._entry(name)
        if (self.policy != "demand" and not hinted) or e.pinned or e.error is not None:
            return e.engine.tier
        prot = 1 if hinted else self.demand.get(name, 0)
        try:
            if not await self._promote(e, Tier.HBM, wait=False, protect_demand=prot):
                await self._promote(e, Tier.DRAM, wait=False, protect_demand=prot)
        except ExpertLoadError:
            pass
        return e.engine.tier

    def error_of(self, name: str) -> ExpertLoadError | None:
        """The permanent failure of ``name`` (missing or corrupt files), if any."""
        return self._entry(name).error

    def backoff_of(self, name: str) -> ExpertTransientError | None:
        """A transient failure whose backoff has not passed yet (requests go elsewhere meanwhile)."""
        e = self._entry(name)
        if e.transient is None or time.monotonic() >= e.retry_at:
            return None
        return self._backing_off(e)

    async def warm(self, name: str) -> Tier:
        """Bring ``name`` to the DRAM tier (an engine start for vLLM), waiting for room; what a
        background start after ``add`` and a retry after a transient failure do."""
        e = self._entry(name)
        await self._promote(e, Tier.DRAM, wait=True)
        return e.engine.tier

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
            "expert_swaps": {n: dict(v) for n, v in self.metrics.expert_swaps.items()},
            "expert_swap_seconds": {n: dict(v) for n, v in self.metrics.expert_swap_seconds.items()},
            "charged_bytes": {n: {t.value: b for t, b in e.charge.items()} for n, e in self._entries.items()},
        }
