"""ExpertPool: per-expert queues over one set of tier budgets, batched by expert.

Scheduling (one asyncio task, woken by arrivals/completions and every ``max_wait_ms/4``):

* each expert has a bounded FIFO queue (:class:`~coe.errors.QueueFull` when full);
* an expert with queued requests gets a *session*: it acquires the expert from the tier manager
  (HBM-resident + lease) and admits queued requests to the engine, up to ``max_batch_size`` in
  flight — the engine batches the requests it has at once;
* a session ends when its queue drains (lease released; the expert stays resident until evicted),
  or when another expert without a lease has a request older than ``max_wait_ms`` and older than
  this expert's oldest: then it stops admitting, lets in-flight requests finish and releases the
  lease so the tier manager can swap. Under starvation this is global FIFO; otherwise batch-by-expert.
* ``residency_hint()`` gives the router the "already hot" term; ``hint_demand()`` takes the router's
  demand forecast, which (policy ``demand``) drives prefetch of the next expert while one generates.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from coe.engines import create_engine
from coe.engines.base import ChatMessage, Engine, GenerationChunk, SamplingParams, Tier
from coe.errors import (
    ExpertExistsInPool,
    ExpertLoadError,
    ExpertNotServed,
    PoolClosed,
    QueueFull,
)
from coe.tiers import TierManager

log = logging.getLogger(__name__)


def _default_hbm(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return int(total * 0.6)  # weights; the rest is KV cache/activations headroom
    return 4 << 30


def _default_dram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)
    except (ValueError, OSError):  # pragma: no cover
        return 8 << 30


class PoolConfig(BaseModel):
    """Knobs of one pool (one per GPU, or one on CPU). Budgets count model weights only."""

    model_config = ConfigDict(extra="forbid")

    device: str = "cpu"
    hbm_budget_bytes: int | None = Field(None, ge=0, description="active-tier budget; None: 60% of GPU / 4 GiB on CPU")
    dram_budget_bytes: int | None = Field(None, ge=0, description="host-tier budget; None: half the RAM")
    policy: Literal["lru", "demand"] = "lru"
    max_wait_ms: float = Field(2000.0, gt=0)
    max_queue_per_expert: int = Field(64, ge=1)
    max_batch_size: int = Field(8, ge=1)


class ExpertState(BaseModel):
    tier: str
    status: Literal["ready", "loading", "failed", "removing"]
    queue_depth: int
    in_flight: int
    error: str | None = None


@dataclass
class _Pending:
    messages: Sequence[ChatMessage | Mapping[str, Any]]
    params: SamplingParams
    arrival: float
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    finished: bool = False


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
    served: int = 0
    running: set = field(default_factory=set)  # asyncio.Tasks of admitted requests


class ExpertPool:
    """Plain-Python pool of experts sharing one accelerator (Ray Serve wraps it in coe/serve)."""

    def __init__(self, config: PoolConfig | None = None, **engine_kwargs: Any):
        self.config = config or PoolConfig()
        dev = self.config.device
        self.tiers = TierManager(
            self.config.hbm_budget_bytes if self.config.hbm_budget_bytes is not None else _default_hbm(dev),
            self.config.dram_budget_bytes if self.config.dram_budget_bytes is not None else _default_dram(),
            self.config.policy,
        )
        self._engine_kwargs = {"max_batch_size": self.config.max_batch_size, **engine_kwargs}
        self._slots: dict[str, _Slot] = {}
        self._router_demand: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._loop_task: asyncio.Task | None = None
        self._prefetch_task: asyncio.Task | None = None

    # ---------------------------------------------------------------- membership
    async def add_expert(self, expert: Any) -> None:
        """Admit ``expert``: checks it fits the budgets now (ExpertTooLarge) and that its files are
        readable (ExpertLoadError); weights load on first use."""
        if self._closed:
            raise PoolClosed("the expert pool is closed")
        if expert.name in self._slots:
            raise ExpertExistsInPool(f"expert {expert.name!r} is already in this pool")
        engine = create_engine(expert, device=self.config.device, **self._engine_kwargs)
        try:
            size = await asyncio.to_thread(engine.footprint_bytes)
        except Exception as exc:  # missing / unreadable files: refuse now, with the reason
            raise ExpertLoadError(expert.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        self.tiers.register(expert.name, engine, size)
        self._slots[expert.name] = _Slot(expert.name, engine)
        self._ensure_loop()

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
        slot = self._slot(name)
        if slot.removing:
            raise ExpertNotServed(f"expert {name!r} is being removed from this pool")
        err = self.tiers.error_of(name)
        if err is not None:
            raise err
        if len(slot.queue) >= self.config.max_queue_per_expert:
            raise QueueFull(f"expert {name!r} has {len(slot.queue)} queued requests (max_queue_per_expert)")
        p = _Pending(messages, params or SamplingParams(), time.monotonic())
        slot.queue.append(p)
        self._ensure_loop()
        self._kick()
        try:
            while True:
                item = await p.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not p.finished:
                p.finished = True
                if p.task is not None:
                    p.task.cancel()
                else:
                    with contextlib.suppress(ValueError):
                        slot.queue.remove(p)
                self._kick()

    # ---------------------------------------------------------------- scheduler
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="coe-pool-scheduler")

    def _kick(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        tick = max(self.config.max_wait_ms / 4000.0, 0.005)
        while not self._closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
            self._wake.clear()
            try:
                self._tick()
            except Exception:  # pragma: no cover - a scheduler bug must not kill serving
                log.exception("scheduler tick failed")

    def _starving(self, now: float) -> _Pending | None:
        """Oldest request older than max_wait_ms among experts that hold no lease."""
        limit = self.config.max_wait_ms / 1000.0
        worst: _Pending | None = None
        for s in self._slots.values():
            if s.queue and s.acquired is None and now - s.queue[0].arrival > limit:
                if worst is None or s.queue[0].arrival < worst.arrival:
                    worst = s.queue[0]
        return worst

    def _tick(self) -> None:
        now = time.monotonic()
        starving = self._starving(now)
        for s in list(self._slots.values()):
            may = starving is None or (s.queue and s.queue[0].arrival <= starving.arrival)
            if s.acquired is not None:
                while s.queue and s.in_flight < self.config.max_batch_size and may:
                    self._admit(s, s.queue.popleft())
                    may = starving is None or (s.queue and s.queue[0].arrival <= starving.arrival)
                if s.in_flight == 0 and (not s.queue or not may):
                    s.session_end.set()
            elif s.session is None and s.queue and may:
                s.session_end = asyncio.Event()
                s.session = asyncio.get_running_loop().create_task(self._session(s), name=f"coe-session-{s.name}")
        self._update_demand()

    async def _session(self, s: _Slot) -> None:
        try:
            s.loading = True
            async with self.tiers.acquire(s.name) as engine:
                s.loading = False
                s.acquired = engine
                self._tick()
                await s.session_end.wait()
                s.acquired = None
        except ExpertLoadError as exc:
            log.warning("%s", exc)
            while s.queue:
                p = s.queue.popleft()
                p.finished = True
                p.out.put_nowait(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pragma: no cover - unexpected: fail queued requests, keep serving
            log.exception("session for %s failed", s.name)
            while s.queue:
                s.queue.popleft().out.put_nowait(exc)
        finally:
            s.loading = False
            s.acquired = None
            s.session = None
            self._kick()

    def _admit(self, s: _Slot, p: _Pending) -> None:
        assert s.acquired is not None
        s.in_flight += 1
        p.task = asyncio.get_running_loop().create_task(self._run(s, s.acquired, p))
        s.running.add(p.task)
        p.task.add_done_callback(s.running.discard)

    async def _run(self, s: _Slot, engine: Engine, p: _Pending) -> None:
        agen = engine.generate(p.messages, p.params)
        try:
            async for chunk in agen:
                p.out.put_nowait(chunk)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            p.out.put_nowait(exc)
        finally:
            with contextlib.suppress(Exception):
                await agen.aclose()
            s.in_flight -= 1
            s.served += 1
            self._kick()

    # ---------------------------------------------------------------- router interface
    def _update_demand(self) -> None:
        demand = {n: len(s.queue) + s.in_flight + self._router_demand.get(n, 0) for n, s in self._slots.items()}
        self.tiers.hint_demand(demand)
        if self.config.policy != "demand":
            return
        if self._prefetch_task is not None and not self._prefetch_task.done():
            return
        cands = [
            (d, n) for n, d in demand.items()
            if d > 0 and not self._slots[n].removing and self._slots[n].acquired is None
            and self.tiers.tier_of(n) is not Tier.HBM and self.tiers.error_of(n) is None
        ]
        if cands:
            _, name = max(cands)
            self._prefetch_task = asyncio.get_running_loop().create_task(self.tiers.prefetch(name))

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
            if s.removing or self.tiers.error_of(n) is not None:
                out[n] = 0.0
                continue
            base = {Tier.HBM: 1.0, Tier.DRAM: 0.5, Tier.DISK: 0.0}[s.engine.tier]
            out[n] = base / (1.0 + len(s.queue) / self.config.max_batch_size)
        return out

    # ---------------------------------------------------------------- observability
    def state(self) -> dict[str, ExpertState]:
        out: dict[str, ExpertState] = {}
        for n, s in self._slots.items():
            err = self.tiers.error_of(n)
            status = "failed" if err else "removing" if s.removing else "loading" if s.loading else "ready"
            out[n] = ExpertState(tier=s.engine.tier.value, status=status, queue_depth=len(s.queue),
                                 in_flight=s.in_flight, error=err.reason if err else None)
        return out

    def metrics(self) -> dict[str, Any]:
        snap = self.tiers.snapshot()
        snap["queue_depth"] = {n: len(s.queue) for n, s in self._slots.items()}
        snap["in_flight"] = {n: s.in_flight for n, s in self._slots.items()}
        snap["served"] = {n: s.served for n, s in self._slots.items()}
        snap["batch_sizes"] = {n: list(s.engine.stats().batch_sizes[-100:]) for n, s in self._slots.items()}
        return snap

    async def close(self) -> None:
        """Cancel everything in flight and free every tier."""
        self._closed = True
        for s in self._slots.values():
            for p in list(s.queue):
                p.out.put_nowait(PoolClosed("the expert pool is closed"))
            s.queue.clear()
            s.session_end.set()
        running = [t for s in self._slots.values() for t in s.running]
        for t in [*running, self._loop_task, self._prefetch_task, *(s.session for s in self._slots.values())]:
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        for s in list(self._slots.values()):
            with contextlib.suppress(Exception):
                await s.engine.close()
