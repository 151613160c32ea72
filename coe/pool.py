"""ExpertPool: per-expert queues over one set of tier budgets, batched by expert.

The pool runs the asyncio side; *what* to do is decided by a pure policy in :mod:`coe.scheduler`
(read its docstring for the rules and the starvation bound). One scheduler task, woken by arrivals,
completions and session changes (and at the time the policy asks for), builds a view of every
expert's queue and session and applies the policy's decision:

* each expert has a bounded FIFO queue (:class:`~coe.errors.QueueFull` when full);
* a *session* holds the expert acquired from the tier manager (HBM-resident + lease); the policy
  starts sessions only where their weights fit beside the other sessions, so which expert comes in
  next is the policy's choice, not the order acquires happened to wait in;
* an active session admits its queue up to ``max_batch_size`` in flight (the engine batches them);
  when another expert needs its space the policy closes only that session: it admits nothing new,
  its in-flight requests finish, the lease is released and the tier manager swaps;
* a session whose queue and in-flight requests are empty ends at once (the weights stay resident
  until something needs the space);
* ``residency_hint()`` gives the router the "already hot" term; ``hint_demand()`` takes the router's
  demand forecast, which (policy ``demand``) drives prefetch of the policy's next expert.

``PoolConfig.scheduler="fifo"`` keeps the former rule (FIFO across experts under starvation) for
baselines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from coe.engines import EngineFactory, create_engine
from coe.engines.base import ChatMessage, Engine, GenerationChunk, SamplingParams, Tier, relay
from coe.errors import (
    EngineStalled,
    ExpertExistsInPool,
    ExpertLoadError,
    ExpertNotServed,
    ExpertStarting,
    ExpertTransientError,
    PoolClosed,
    QueueFull,
)
from expert_registry.spec import EngineSettings, Expert
from coe.scheduler import POLICIES, ExpertView, SchedulerParams, auto_min_batch, auto_quantum
from coe.tiers import TierManager

log = logging.getLogger(__name__)


def _default_hbm(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total * 0.9)  # every engine's whole footprint is counted; 10% for other processes
    return 4 << 30


def _default_dram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError):  # pragma: no cover
        return 8 << 30


def _vllm_defaults() -> EngineSettings:
    """Engine defaults a pool applies where an expert leaves a setting unset: a bounded KV cache
    (so an engine's footprint is known before it starts) and eager mode (starts in seconds)."""
    return EngineSettings(kv_cache_bytes=4 << 30, gpu_memory_utilization=0.1, enforce_eager=True)


class PoolConfig(BaseModel):
    """Knobs of one pool (one per node; on CPU one per replica). The HBM budget counts every
    engine's whole device footprint (see :mod:`coe.engines.memory`), not only its weights."""

    model_config = ConfigDict(extra="forbid")

    device: str = "cpu"
    hbm_budget_bytes: int | None = Field(None, ge=0, description="device budget, every engine's whole footprint; None: 90% of the GPU / 4 GiB on CPU")
    dram_budget_bytes: int | None = Field(None, ge=0, description="host-tier budget; None: half the RAM")
    policy: Literal["lru", "demand"] = "lru"
    max_wait_ms: float = Field(2000.0, gt=0, description="starvation threshold: past it an expert preempts one session")
    max_queue_per_expert: int = Field(64, ge=1)
    max_batch_size: int = Field(8, ge=1)
    scheduler: Literal["batch", "fifo"] = Field("batch", description="batch by expert (default) or the former FIFO rule")
    quantum_ms: float | None = Field(None, gt=0, description="time slice when others wait; None: 9x the measured switch, within [max_wait/10, max_wait]")
    min_batch: int | None = Field(None, ge=1, description="queued requests an expert needs to preempt a session past its quantum; None: max_batch_size/4 in [1, 8]")
    engine_defaults: EngineSettings = Field(default_factory=_vllm_defaults,
                                            description="engine settings for experts that leave them unset")
    engine_overhead_bytes: int = Field(2 << 30, ge=0, description="estimated device bytes of an awake vLLM engine beyond weights + KV cache (context, activations, graphs) until measured")
    sleeping_engine_bytes: int = Field(768 << 20, ge=0, description="estimated device bytes a sleeping vLLM engine keeps (its CUDA context) until measured")
    load_timeout_s: float | None = Field(900.0, gt=0, description="an engine start (DISK->DRAM) taking longer is a transient failure")
    wake_timeout_s: float | None = Field(120.0, gt=0, description="a wake (DRAM->HBM) taking longer is a transient failure")
    memory_wait_s: float | None = Field(300.0, gt=0, description="a start or wake waiting longer for memory that "
                                        "running work holds is a transient failure (no wait without bound)")
    stall_timeout_s: float | None = Field(120.0, gt=0, description="a request whose engine gives no token for this "
                                          "long ends with a transient error, and the engine is restarted")
    watchdog_s: float | None = Field(60.0, gt=0, description="a request waiting longer than this (queued, or with no "
                                     "token) makes the replica log the pool's whole state once (its replica log)")
    retry_backoff_s: float = Field(2.0, gt=0, description="first wait after a transient failure; doubles per failure")
    retry_backoff_max_s: float = Field(120.0, gt=0, description="longest wait between retries")
    start_on_add: bool = Field(True, description="start an added expert's engine in the background (to DRAM)")
    start_delay_s: dict[str, float] = Field(
        default_factory=dict, description="for tests only (leave empty): expert -> seconds its engine start is "
                                          "held before it reads anything, like a slow disk; counted in load_timeout_s")


class ExpertState(BaseModel):
    tier: str
    status: Literal["ready", "loading", "unavailable", "failed", "removing"]
    phase: str | None = None  # while loading: "starting engine", "waiting for memory", ...
    queue_depth: int
    in_flight: int
    error: str | None = None
    retry_in_s: float | None = None  # unavailable: when the pool tries again
    loading_s: float | None = None  # loading after add: seconds since the expert was added


@dataclass(eq=False)  # hashed by identity: the watchdog keeps a set of those in flight
class _Pending:
    messages: Sequence[ChatMessage | Mapping[str, Any]]
    params: SamplingParams
    arrival: float
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    finished: bool = False
    last_token: float | None = None  # monotonic time of its latest token (of admission before the first)


@dataclass
class _Slot:
    name: str
    engine: Engine
    queue: collections.deque = field(default_factory=collections.deque)
    in_flight: int = 0
    session: asyncio.Task | None = None
    acquired: Engine | None = None
    session_end: asyncio.Event = field(default_factory=asyncio.Event)
    removing: bool = False
    loading: bool = False
    starting: bool = False  # its first engine start (begun at add) has not ended yet
    added_at: float = field(default_factory=time.monotonic)
    served: int = 0
    running: set = field(default_factory=set)  # asyncio.Tasks of admitted requests
    admitted: set = field(default_factory=set)  # their _Pending records (for the watchdog)
    closing: bool = False  # the policy closed this session: no admission, release when drained
    stalled: bool = False  # a request's engine stalled: restart the engine when the session ends
    active_since: float = 0.0
    last_admit: float = 0.0
    service_s: float = 0.0  # EWMA of admit -> finish of its requests (drain estimate)
    arrival_sum: float = 0.0  # Σ arrival times of queued requests (Σ waits = n·now − this)
    rate_acc: float = 0.0  # decayed arrival count (rate = rate_acc / RATE_TAU_S)
    rate_t: float = 0.0

    def push(self, p: "_Pending") -> None:
        decay = math.exp(-(p.arrival - self.rate_t) / RATE_TAU_S) if self.rate_t else 0.0
        self.rate_acc, self.rate_t = self.rate_acc * decay + 1.0, p.arrival
        self.queue.append(p)
        self.arrival_sum += p.arrival

    def pop(self) -> "_Pending":
        p = self.queue.popleft()
        self.arrival_sum -= p.arrival
        if not self.queue:
            self.arrival_sum = 0.0
        return p

    def drop(self, p: "_Pending") -> None:
        self.queue.remove(p)  # ValueError when already admitted
        self.arrival_sum -= p.arrival
        if not self.queue:
            self.arrival_sum = 0.0

    def rate(self, now: float) -> float:
        if not self.rate_t:
            return 0.0
        return self.rate_acc * math.exp(-(now - self.rate_t) / RATE_TAU_S) / RATE_TAU_S


RATE_TAU_S = 10.0  # horizon of the arrival-rate estimate the policy weighs sessions by


class ExpertPool:
    """Plain-Python pool of experts sharing one accelerator (Ray Serve wraps it in coe/serve)."""

    def __init__(self, config: PoolConfig | None = None, engine_factory: EngineFactory = create_engine):
        """``engine_factory`` builds each added expert's engine (default: by ``Expert.engine``)."""
        self.config = c = config or PoolConfig()
        self._engine_factory = engine_factory
        self.tiers = TierManager(
            c.hbm_budget_bytes if c.hbm_budget_bytes is not None else _default_hbm(c.device),
            c.dram_budget_bytes if c.dram_budget_bytes is not None else _default_dram(),
            c.policy, load_timeout_s=c.load_timeout_s, wake_timeout_s=c.wake_timeout_s,
            retry_backoff_s=c.retry_backoff_s, retry_backoff_max_s=c.retry_backoff_max_s,
            memory_wait_s=c.memory_wait_s,
        )
        self.tiers.start_delay_s = dict(c.start_delay_s)
        self._background: set[asyncio.Task] = set()
        self._slots: dict[str, _Slot] = {}
        self._router_demand: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._loop_task: asyncio.Task | None = None
        self._prefetch_task: asyncio.Task | None = None
        self._policy = POLICIES[self.config.scheduler]()
        self._next_wake: float | None = None
        self.decisions: collections.deque = collections.deque(maxlen=200)  # (t, reasons) for debugging

    # ---------------------------------------------------------------- membership
    async def add_expert(self, expert: Expert) -> None:
        """Admit ``expert``: checks it fits the budgets now (ExpertTooLarge) and that its files are
        readable (ExpertLoadError); weights load on first use."""
        if self._closed:
            raise PoolClosed("the expert pool is closed")
        if expert.name in self._slots:
            raise ExpertExistsInPool(f"expert {expert.name!r} is already in this pool")
        c = self.config
        engine = self._engine_factory(expert, device=c.device, max_batch_size=c.max_batch_size,
                                      defaults=c.engine_defaults, overhead_bytes=c.engine_overhead_bytes,
                                      asleep_bytes=c.sleeping_engine_bytes)
        try:
            await asyncio.to_thread(engine.footprint_bytes)
        except Exception as exc:  # missing / unreadable files: refuse now, with the reason
            raise ExpertLoadError(expert.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        self.tiers.register(expert.name, engine)
        self._slots[expert.name] = slot = _Slot(expert.name, engine, starting=c.start_on_add)
        self._ensure_loop()
        if c.start_on_add:
            self._spawn(self._start(slot), f"coe-start-{expert.name}")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start(self, slot: _Slot) -> None:
        """The background start after add; while it runs the expert is ``loading`` (with its phase)
        and :meth:`wait_started` holds requests that name it."""
        try:
            await self._warm(slot.name)
        finally:
            slot.starting = False
            self._kick()

    def starting(self, name: str) -> bool:
        """Whether ``name``'s engine is still starting after it was added (not failed, not backing
        off after a transient failure: those answer at once)."""
        s = self._slot(name)  # the start task's own flag: the engine leaves DISK before the start ends
        return (s.starting and not s.removing
                and self.tiers.error_of(name) is None and self.tiers.backoff_of(name) is None)

    def _check_servable(self, name: str) -> "_Slot":
        """The expert's slot, if it can take a request now: raises ``ExpertNotServed`` while it is
        being removed, its permanent error, or its transient error while the replica backs off."""
        slot = self._slot(name)
        if slot.removing:
            raise ExpertNotServed(f"expert {name!r} is being removed from this pool")
        err = self.tiers.error_of(name) or self.tiers.backoff_of(name)
        if err is not None:
            raise err
        return slot

    async def wait_started(self, name: str, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the start begun at add to finish. Raises what ended it
        instead (:class:`ExpertLoadError` for missing or corrupt files, :class:`ExpertTransientError`
        for out of memory or a timeout, :class:`ExpertNotServed` when the expert is removed), or
        :class:`ExpertStarting` when the wait runs out first: a waiting request never outlives a
        start that failed."""
        end = time.monotonic() + max(0.0, timeout_s)
        while True:
            s = self._check_servable(name)
            if not self.starting(name):
                return
            now = time.monotonic()
            if now >= end:
                waited = now - s.added_at
                # a start that has run t seconds likely needs about as long again (1..30 s)
                raise ExpertStarting(name, self.tiers.phase_of(name), waited, min(30.0, max(1.0, waited)))
            await asyncio.sleep(min(0.05, end - now))

    async def _warm(self, name: str) -> None:
        """Start ``name``'s engine in the background (to DRAM); after a transient failure, try
        again when its backoff has passed, until it starts, fails for good or leaves the pool."""
        while not self._closed and name in self._slots and not self._slots[name].removing:
            try:
                await self.tiers.warm(name)
                return
            except ExpertTransientError as exc:
                await asyncio.sleep(max(exc.retry_after_s, 0.05))
            except ExpertLoadError as exc:
                log.warning("%s", exc)
                return
            except ExpertNotServed:
                return
            finally:
                self._kick()

    async def remove_expert(self, name: str) -> None:
        """Stop accepting requests for ``name``; accepted ones finish; then its memory is freed."""
        slot = self._slot(name)
        slot.removing = True
        self._kick()
        while slot.queue or slot.in_flight or slot.session is not None:
            await asyncio.sleep(0.01)
        await self.tiers.unregister(name)
        await slot.engine.close()
        del self._slots[name]

    def experts(self) -> list[str]:
        return [n for n, s in self._slots.items() if not s.removing]

    def engine(self, name: str) -> Engine:
        return self._slot(name).engine

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise ExpertNotServed(f"expert {name!r} is not served by this pool")
        return slot

    # ---------------------------------------------------------------- requests
    def count_prompt_tokens(self, name: str, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> int:
        return self._slot(name).engine.count_prompt_tokens(messages)

    async def generate(
        self, name: str, messages: Sequence[ChatMessage | Mapping[str, Any]], params: SamplingParams | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """Queue a request and stream its chunks. Closing the stream cancels it and frees its slot."""
        if self._closed:
            raise PoolClosed("the expert pool is closed")
        slot = self._check_servable(name)
        if len(slot.queue) >= self.config.max_queue_per_expert:
            raise QueueFull(f"expert {name!r} has {len(slot.queue)} queued requests (max_queue_per_expert)")
        p = _Pending(messages, params or SamplingParams(), time.monotonic())
        slot.push(p)
        self._ensure_loop()
        self._kick()
        try:
            async for item in relay(p.out):
                yield item
        finally:
            if not p.finished:
                p.finished = True
                if p.task is not None:
                    p.task.cancel()
                else:
                    with contextlib.suppress(ValueError):
                        slot.drop(p)
                self._kick()

    # ---------------------------------------------------------------- scheduler
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="coe-pool-scheduler")

    def _kick(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while not self._closed:
            tick = self._next_wake if self._next_wake is not None else self.config.max_wait_ms / 4000.0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(tick, 0.002))
            self._wake.clear()
            try:
                self._tick()
            except Exception:  # pragma: no cover - a scheduler bug must not kill serving
                log.exception("scheduler tick failed")

    def _switch_s(self) -> float:
        """Mean measured switch (DRAM→HBM in + HBM→DRAM out); 0 before the first one."""
        m = self.tiers.metrics
        out = 0.0
        for k in ("dram->hbm", "hbm->dram"):
            if m.swaps.get(k):
                out += m.swap_seconds.get(k, 0.0) / m.swaps[k]
        return out

    def scheduler_params(self) -> SchedulerParams:
        c = self.config
        max_wait = c.max_wait_ms / 1000.0
        switch = self._switch_s()
        return SchedulerParams(
            capacity=c.max_batch_size, budget_bytes=self.tiers.budget[Tier.HBM], max_wait_s=max_wait,
            quantum_s=c.quantum_ms / 1000.0 if c.quantum_ms is not None else auto_quantum(switch, max_wait),
            min_batch=c.min_batch if c.min_batch is not None else auto_min_batch(c.max_batch_size),
            switch_s=switch,
        )


    def _view(self, s: _Slot, now: float) -> ExpertView:
        if s.session is None:
            phase = "idle"
        elif s.acquired is None:
            phase = "loading"
        elif s.closing or s.session_end.is_set():
            phase = "closing"
        else:
            phase = "active"
        n = len(s.queue)
        drain = max(0.0, s.service_s - (now - s.last_admit)) if s.in_flight else 0.0
        # HBM held outside a session: a sleeping engine's context, or a move's reservation
        held = self.tiers.charged(s.name)[Tier.HBM] if s.engine.tier is not Tier.HBM else 0
        moving = self.tiers.moving(s.name)
        return ExpertView(
            name=s.name, size_bytes=self.tiers.memory_of(s.name).active_bytes, queued=n,
            oldest_wait_s=now - s.queue[0].arrival if n else 0.0,
            wait_sum_s=max(0.0, n * now - s.arrival_sum) if n else 0.0,
            in_flight=s.in_flight, resident=s.engine.tier is Tier.HBM, phase=phase,
            session_age_s=now - s.active_since if phase == "active" else 0.0, drain_s=drain,
            rate=s.rate(now), hint=self._router_demand.get(s.name, 0),
            failed=self.tiers.error_of(s.name) is not None or self.tiers.backoff_of(s.name) is not None,
            asleep_bytes=0 if moving else held, moving_bytes=held if moving else 0,
        )

    def _tick(self) -> None:
        if self._closed:
            return
        params = self.scheduler_params()
        for _ in range(1 + sum(len(s.queue) for s in self._slots.values())):
            now = time.monotonic()
            d = self._policy.decide([self._view(s, now) for s in self._slots.values()], params)
            changed = bool(d.admit or d.start or d.close)
            if d.reasons:
                self.decisions.append((now, dict(d.reasons)))
                log.debug("scheduler: %s", d.reasons)
            for name in d.close:
                self._slots[name].closing = True
            for name, n in d.admit.items():
                s = self._slots[name]
                for _ in range(min(n, len(s.queue))):
                    self._admit(s, s.pop())
            for name in d.release:
                s = self._slots[name]
                if s.in_flight == 0:
                    s.session_end.set()
            for name in d.start:
                s = self._slots[name]
                if s.session is None:
                    s.session_end = asyncio.Event()
                    s.closing = False
                    s.session = asyncio.get_running_loop().create_task(self._session(s), name=f"coe-session-{s.name}")
            self._next_wake = d.wake_in_s
            if not changed:
                break
        self._update_demand(d.prefetch)

    async def _session(self, s: _Slot) -> None:
        try:
            s.loading = True
            async with self.tiers.acquire(s.name) as engine:
                s.loading = False
                s.acquired = engine
                s.active_since = time.monotonic()
                self._tick()
                await s.session_end.wait()
                s.acquired = None
        except (ExpertLoadError, ExpertTransientError) as exc:
            log.warning("%s", exc)
            while s.queue:
                p = s.pop()
                p.finished = True
                p.out.put_nowait(exc)
            if isinstance(exc, ExpertTransientError) and exc.retry_after_s:
                self._spawn(self._warm(s.name), f"coe-retry-{s.name}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pragma: no cover - unexpected: fail queued requests, keep serving
            log.exception("session for %s failed", s.name)
            while s.queue:
                s.pop().out.put_nowait(exc)
        finally:
            s.loading = False
            s.acquired = None
            s.closing = False
            s.session = None
            if s.stalled and not self._closed:  # the engine's process may be wedged: a fresh start
                s.stalled = False
                self._spawn(self._restart(s.name), f"coe-restart-{s.name}")
            self._kick()

    async def _restart(self, name: str) -> None:
        """Shut a stalled engine down (DISK); its next request starts it again."""
        try:
            await self.tiers.demote(name, Tier.DISK)
        except Exception:  # noqa: BLE001 - a dead engine may fail to stop; its next start reports
            log.exception("restarting the engine of %s failed", name)
        finally:
            self._kick()

    def _admit(self, s: _Slot, p: _Pending) -> None:
        assert s.acquired is not None
        s.in_flight += 1
        s.last_admit = time.monotonic()
        p.task = asyncio.get_running_loop().create_task(self._run(s, s.acquired, p))
        s.running.add(p.task)
        s.admitted.add(p)
        p.task.add_done_callback(s.running.discard)
        p.task.add_done_callback(lambda _t: s.admitted.discard(p))

    async def _run(self, s: _Slot, engine: Engine, p: _Pending) -> None:
        t0 = p.last_token = time.monotonic()
        agen = engine.generate(p.messages, p.params)
        stall = self.config.stall_timeout_s
        ok = False
        try:
            while True:  # each token within stall_timeout_s of the last (decision 10)
                try:  # asyncio.timeout, not wait_for: no extra task per token
                    async with asyncio.timeout(stall):
                        chunk = await agen.__anext__()
                except StopAsyncIteration:
                    break
                p.last_token = time.monotonic()
                p.out.put_nowait(chunk)
            ok = True
        except asyncio.CancelledError:
            pass
        except asyncio.TimeoutError:
            s.stalled = True
            log.error("expert %s: a request got no token for %.0f s; restarting its engine after the session", s.name,
                      stall)
            p.out.put_nowait(EngineStalled(s.name, stall or 0.0))
        except Exception as exc:
            p.out.put_nowait(exc)
        finally:
            with contextlib.suppress(Exception):
                await agen.aclose()
            if ok:
                dt = time.monotonic() - t0
                s.service_s = dt if s.service_s == 0.0 else 0.8 * s.service_s + 0.2 * dt
            s.in_flight -= 1
            s.served += 1
            self._kick()

    # ---------------------------------------------------------------- router interface
    def _update_demand(self, nxt: str | None = None) -> None:
        """Queued demand to the tier manager (eviction order); under ``demand``, prefetch the
        policy's next expert (or, for the fifo rule, the most demanded non-resident one)."""
        demand = {n: len(s.queue) + s.in_flight + self._router_demand.get(n, 0) for n, s in self._slots.items()}
        self.tiers.hint_demand(demand)
        if self.config.policy != "demand":
            return
        if self._prefetch_task is not None and not self._prefetch_task.done():
            return
        if self.config.scheduler == "batch" and any(s.session is not None and s.acquired is None
                                                    for s in self._slots.values()):
            return  # a session is acquiring space a prefetch could take from it (a wasted copy)
        cands = [
            (d, n) for n, d in demand.items()
            if d > 0 and not self._slots[n].removing and self._slots[n].acquired is None
            and self.tiers.tier_of(n) is not Tier.HBM and self.tiers.error_of(n) is None
        ]
        names = {n for _, n in cands}
        name = nxt if nxt in names else (max(cands)[1] if cands else None)
        if name is not None:
            self._prefetch_task = asyncio.get_running_loop().create_task(self.tiers.prefetch(name))

    def prefetch_hint(self, name: str, request_id: str | None = None) -> bool:
        """The router's hint that a request for ``name`` is on its way (stage 1 was confident; see
        :mod:`coe.serve.warm_hint`): start moving it up now, as a prefetch — within the budgets,
        without waiting, never evicting an expert with queued or running work, and not while a
        session is acquiring space (the copy could take it). Recorded as a ``hint`` event; returns
        whether a move was started."""
        self.tiers.metrics.event(name, f"hint {request_id or '-'}")
        slot = self._slots.get(name)
        if (self._closed or slot is None or slot.removing or slot.session is not None
                or self.tiers.tier_of(name) is Tier.HBM or self.tiers.error_of(name) is not None
                or self.tiers.backoff_of(name) is not None
                or (self._prefetch_task is not None and not self._prefetch_task.done())
                or any(s.session is not None and s.acquired is None for s in self._slots.values())):
            return False
        # the tier manager must know what is queued before it picks victims
        self.tiers.hint_demand({n: len(s.queue) + s.in_flight + self._router_demand.get(n, 0)
                                for n, s in self._slots.items()})
        self._prefetch_task = asyncio.get_running_loop().create_task(self._hinted_prefetch(name))
        return True

    async def _hinted_prefetch(self, name: str) -> None:
        try:
            await self.tiers.prefetch(name, hinted=True)
        except (ExpertTransientError, ExpertLoadError, ExpertNotServed) as exc:  # the request will report it
            log.debug("hinted prefetch of %s: %s", name, exc)
        finally:
            self._kick()

    def hint_demand(self, demand: Mapping[str, int]) -> None:
        """Router's forecast of requests per expert (e.g. routed but not yet queued)."""
        self._router_demand = {k: int(v) for k, v in demand.items() if k in self._slots}
        if self._slots:
            self._ensure_loop()
            self._kick()

    def residency_hint(self) -> dict[str, float]:
        """0..1 per expert for Router.route(residency=...): HBM 1.0, DRAM 0.5, DISK 0, failed 0,
        divided by (1 + queued/max_batch_size) so a long queue makes an expert less attractive."""
        out: dict[str, float] = {}
        for n, s in self._slots.items():
            if s.removing or self.tiers.error_of(n) is not None or self.tiers.backoff_of(n) is not None:
                out[n] = 0.0
                continue
            base = {Tier.HBM: 1.0, Tier.DRAM: 0.5, Tier.DISK: 0.0}[s.engine.tier]
            out[n] = base / (1.0 + len(s.queue) / self.config.max_batch_size)
        return out

    # ---------------------------------------------------------------- observability
    def longest_wait_s(self) -> float:
        """The longest any request has now waited: queued, or admitted with no token since."""
        now = time.monotonic()
        waits = [now - s.queue[0].arrival for s in self._slots.values() if s.queue]
        waits += [now - (p.last_token or p.arrival) for s in self._slots.values() for p in s.admitted]
        return max(waits, default=0.0)

    def diagnose(self) -> dict[str, Any]:
        """Everything that decides whether a waiting request moves: per expert its queue, requests
        in flight, session, tier state and engine state; the tier budgets; the scheduler's last
        decisions and tier events; the pool's tasks and where each is suspended. For the watchdog
        (``watchdog_s``): a request that waits too long leaves this in the replica's log."""
        now = time.monotonic()
        slots = {}
        for n, s in self._slots.items():
            slots[n] = {
                "queued": len(s.queue), "oldest_queued_s": round(now - s.queue[0].arrival, 1) if s.queue else None,
                "in_flight": s.in_flight, "silent_s": sorted(round(now - (p.last_token or p.arrival), 1) for p in s.admitted),
                "session": self._view(s, now).phase, "closing": s.closing, "starting": s.starting, "removing": s.removing,
                "engine": s.engine.debug_state(), "charged": {t.value: b for t, b in self.tiers.charged(n).items()},
                "leases": self.tiers.leases(n), "moving": self.tiers.moving(n), "tier_phase": self.tiers.phase_of(n),
            }
        tasks = [{"task": t.get_name(), "at": [f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                                              for f in t.get_stack(limit=4)]}
                 for t in asyncio.all_tasks() if t.get_name().startswith("coe-")]
        return {"slots": slots, "tiers": {k: v for k, v in self.tiers.snapshot().items()
                                          if k in ("budget_bytes", "bytes", "peak_bytes", "swaps", "evictions")},
                "scheduler": vars(self.scheduler_params()), "decisions": [(round(now - t, 1), r) for t, r in
                                                                          list(self.decisions)[-10:]],
                "events": [(round(now - t, 1), n, w) for t, n, w in self.tiers.metrics.events[-30:]], "tasks": tasks}

    def state(self) -> dict[str, ExpertState]:
        out: dict[str, ExpertState] = {}
        for n, s in self._slots.items():
            err, off, phase = self.tiers.error_of(n), self.tiers.backoff_of(n), self.tiers.phase_of(n)
            starting = s.starting  # the same rule as starting(): loading until the start task ends
            status = ("failed" if err else "removing" if s.removing else "unavailable" if off
                      else "loading" if phase or s.loading or starting else "ready")
            if status == "loading" and starting and not phase:
                # the background start has not begun its first step yet, or is settling its last
                phase = "queued to start" if s.engine.tier is Tier.DISK else "finishing start"
            out[n] = ExpertState(tier=s.engine.tier.value, status=status, phase=phase or None,
                                 queue_depth=len(s.queue), in_flight=s.in_flight,
                                 error=(err or off).reason if (err or off) else None,
                                 retry_in_s=round(off.retry_after_s, 3) if off else None,
                                 loading_s=round(time.monotonic() - s.added_at, 1)
                                 if status == "loading" and starting else None)
        return out

    def metrics(self) -> dict[str, Any]:
        snap = self.tiers.snapshot()
        snap["queue_depth"] = {n: len(s.queue) for n, s in self._slots.items()}
        snap["in_flight"] = {n: s.in_flight for n, s in self._slots.items()}
        snap["served"] = {n: s.served for n, s in self._slots.items()}
        snap["batch_sizes"] = {n: list(s.engine.stats().batch_sizes[-100:]) for n, s in self._slots.items()}
        sp = self.scheduler_params()
        snap["scheduler"] = {"policy": self.config.scheduler, "quantum_s": sp.quantum_s, "switch_s": sp.switch_s,
                             "min_batch": sp.min_batch, "max_wait_s": sp.max_wait_s}
        return snap

    async def close(self, close_engines: bool = True) -> None:
        """Cancel everything in flight, then close every engine (freeing every tier), unless
        ``close_engines=False``: the engines stay running, each in its tier, for whoever handed them
        in (see ``engine_factory``)."""
        self._closed = True
        for s in self._slots.values():
            for p in list(s.queue):
                p.out.put_nowait(PoolClosed("the expert pool is closed"))
            s.queue.clear()
            s.arrival_sum = 0.0
            s.session_end.set()
        running = [t for s in self._slots.values() for t in s.running] + list(self._background)
        for t in [*running, self._loop_task, self._prefetch_task, *(s.session for s in self._slots.values())]:
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        if not close_engines:
            return
        for s in list(self._slots.values()):
            with contextlib.suppress(Exception):
                await s.engine.close()
