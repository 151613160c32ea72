"""No request waits without bound (DESIGN decision 10), on the plain pool with real tiny ``hf``
engines that report a vLLM-shaped footprint: an engine starts on the device (its start needs the
whole awake footprint), holds a KV cache awake and keeps its CUDA context asleep.

Found while reproducing the H100 hang of 2026-12-06 on the CPU: at 830a084, once every engine had
started, the sleeping engines' contexts were subtracted from the room the scheduler packs sessions
into, so with room for one awake engine beside sleeping contexts that do not all fit, a request for
a sleeping expert never got a session, and the tier manager, which would have shut a sleeping
engine down to make room, was never asked (two of the three cases below hang there). And an engine
that stops giving tokens must not hold its request, or the session and the room it holds, forever.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import make_expert

from coe.engines.base import SamplingParams, Tier
from coe.engines.hf import HFEngine
from coe.engines.memory import EngineMemory
from coe.pool import ExpertPool, PoolConfig

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
MSG = [{"role": "user", "content": "Name a colour."}]


class DeviceShapedEngine(HFEngine):
    """A real tiny model with a vLLM-shaped footprint (see the module docstring)."""

    KV, CONTEXT = 3_000_000, 1_000_000

    def memory(self) -> EngineMemory:
        w = self.footprint_bytes()
        return EngineMemory(host_bytes=w, active_bytes=w + self.KV, idle_bytes=self.CONTEXT,
                            load_bytes=w + self.KV, measured=self.tier is not Tier.DISK)


def device_shaped(expert, **kw):
    return DeviceShapedEngine(expert, max_batch_size=kw.get("max_batch_size", 8))


async def ask(pool: ExpertPool, name: str) -> int:
    n = 0
    async for c in pool.generate(name, MSG, GREEDY):
        n += bool(c.text)
    return n


def budget_for(tiny_model_dir, awake: int, asleep: int) -> int:
    e = DeviceShapedEngine(make_expert("probe", tiny_model_dir))
    return awake * (e.memory().active_bytes + (64 << 10)) + asleep * DeviceShapedEngine.CONTEXT


@pytest.mark.parametrize("experts,awake,asleep", [(3, 1, 1), (3, 2, 0), (4, 1, 2)])
async def test_every_request_is_served_when_sleeping_contexts_fill_the_budget(tiny_model_dir, experts, awake, asleep):
    names = [f"x{i}" for i in range(experts)]
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=budget_for(tiny_model_dir, awake, asleep), dram_budget_bytes=10**9,
                                 max_wait_ms=300), engine_factory=device_shaped)
    for n in names:
        await pool.add_expert(make_expert(n, tiny_model_dir))
    for n in names:  # every engine has started (and measured itself), as after `coe-registry add`
        await pool.wait_started(n, 60.0)
    order = [names[i % experts] for i in range(4 * experts)] + names[::-1] * 2
    results = await asyncio.wait_for(asyncio.gather(*(ask(pool, n) for n in order)), 60.0)
    assert all(r > 0 for r in results)
    for n in names:  # and one at a time, each after the others
        assert await asyncio.wait_for(ask(pool, n), 30.0) > 0
    assert pool.tiers.peak_bytes[Tier.HBM] <= pool.tiers.budget[Tier.HBM]
    await pool.close()


async def started_beside(tiny_model_dir, engine_cls: type, name: str, **config) -> ExpertPool:
    """A pool with room for one awake engine beside one asleep: expert ``name`` on ``engine_cls``
    and a healthy expert "ok", both started."""
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=budget_for(tiny_model_dir, 1, 1), dram_budget_bytes=10**9,
                                 max_wait_ms=300, **config),
                      engine_factory=lambda e, **kw: engine_cls(e) if e.name == name else device_shaped(e, **kw))
    for n in (name, "ok"):
        await pool.add_expert(make_expert(n, tiny_model_dir))
        await pool.wait_started(n, 60.0)
    return pool


class WedgedOnce(DeviceShapedEngine):
    """The real tiny model, except that its first generation never yields (a wedged engine
    process, as a stuck vLLM engine core would look to the pool)."""

    wedged = True

    async def generate(self, messages, params):
        if WedgedOnce.wedged:
            WedgedOnce.wedged = False
            await asyncio.Event().wait()
        async for chunk in super().generate(messages, params):
            yield chunk


async def test_a_request_whose_engine_stalls_gets_a_typed_error_and_the_engine_restarts(tiny_model_dir):
    from coe.errors import EngineStalled

    pool = await started_beside(tiny_model_dir, WedgedOnce, "w", stall_timeout_s=1.0)
    stuck = asyncio.ensure_future(ask(pool, "w"))
    await asyncio.sleep(0.6)
    assert pool.longest_wait_s() >= 0.5  # admitted, no token yet
    report = pool.diagnose()
    assert report["slots"]["w"]["in_flight"] == 1 and report["slots"]["w"]["session"] == "active"
    assert any(t["task"].startswith("coe-session-w") for t in report["tasks"])
    with pytest.raises(EngineStalled, match="no token for 1 s"):
        await asyncio.wait_for(stuck, 10.0)
    assert await asyncio.wait_for(ask(pool, "ok"), 30.0) > 0  # the other expert takes the room
    assert await asyncio.wait_for(ask(pool, "w"), 30.0) > 0  # a fresh engine start serves it
    assert pool.tiers.metrics.swaps.get("dram->disk", 0) >= 1  # the wedged engine was shut down
    await pool.close()


class SleepWedgedOnce(DeviceShapedEngine):
    """The real tiny model, except that its first sleep (HBM→DRAM) never returns: a vLLM
    ``sleep()`` whose pause never completes would hold the tier manager's lock this way."""

    wedged = True

    async def to_dram(self):
        if SleepWedgedOnce.wedged and self.tier is Tier.HBM:
            SleepWedgedOnce.wedged = False
            await asyncio.Event().wait()
        return await super().to_dram()


async def test_a_sleep_that_never_returns_stops_that_engine_and_the_others_go_on(tiny_model_dir):
    pool = await started_beside(tiny_model_dir, SleepWedgedOnce, "s", wake_timeout_s=1.0)
    assert await asyncio.wait_for(ask(pool, "s"), 30.0) > 0  # "s" is awake now
    assert await asyncio.wait_for(ask(pool, "ok"), 30.0) > 0  # its sleep hangs: stopped after 1 s instead
    assert pool.engine("s").tier is Tier.DISK
    assert any("stopped: going to sleep took longer" in w for _, n, w in pool.tiers.metrics.events if n == "s")
    assert await asyncio.wait_for(ask(pool, "s"), 30.0) > 0  # and starts again when asked
    await pool.close()
