"""The router's warm hint as the pool sees it (issue 14, item 7): a prefetch that starts before the
request, under any tier policy, within the budgets, never evicting an expert with work."""

from __future__ import annotations

import asyncio
import time

from conftest import make_expert

from coe.engines.base import SamplingParams
from coe.pool import ExpertPool, PoolConfig
from coe.serve.warm_hint import hint_category, likely_expert

MSG = [{"role": "user", "content": "Name a colour."}]


async def ask(pool, name, max_tokens=4) -> str:
    out = []
    async for c in pool.generate(name, MSG, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)):
        out.append(c.text)
    return "".join(out)


async def test_hint_moves_the_expert_up_before_its_request_under_lru(tiny_model_dir, byte_model_dir):
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=10**12, dram_budget_bytes=10**12, start_on_add=False))
    for e in (make_expert("a", tiny_model_dir), make_expert("b", byte_model_dir)):
        await pool.add_expert(e)
    assert pool.state()["b"].tier == "disk"
    assert pool.prefetch_hint("b", "req-1")  # a move was started
    deadline = time.monotonic() + 60
    while pool.state()["b"].tier != "hbm" and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert pool.state()["b"].tier == "hbm"  # lru never prefetches on its own; the hint does
    t_request = time.monotonic()
    assert await ask(pool, "b")
    events = [(t, n, w) for t, n, w in pool.tiers.metrics.events if n == "b"]
    assert [w for _, _, w in events][:2] == ["hint req-1", "disk->dram start"]
    assert all(t < t_request for t, _, w in events if w.endswith("start"))  # every move began before the request
    assert pool.metrics()["swaps"].get("disk->dram") == 1  # the request did not load it again
    assert not pool.prefetch_hint("b", "req-2")  # already in HBM: nothing to do
    await pool.close()


async def test_hint_never_evicts_an_expert_with_work_and_respects_the_budget(tiny_model_dir, byte_model_dir):
    a, b = make_expert("a", tiny_model_dir), make_expert("b", byte_model_dir)
    sizer = ExpertPool(PoolConfig(hbm_budget_bytes=10**12, dram_budget_bytes=10**12, start_on_add=False))
    for e in (a, b):
        await sizer.add_expert(e)
        async with sizer.tiers.acquire(e.name):
            pass
    sizes = [sizer.tiers.memory_of(n).active_bytes for n in ("a", "b")]
    await sizer.close()

    budget = sum(sizes) - 1  # room for either awake expert, not both
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=budget, dram_budget_bytes=10**12, start_on_add=False))
    for e in (a, b):
        await pool.add_expert(e)
    job = asyncio.create_task(ask(pool, "a", max_tokens=400))  # a holds HBM while it generates
    while pool.state()["a"].in_flight == 0:
        await asyncio.sleep(0.01)
    pool.prefetch_hint("b", "req-b")
    deadline = time.monotonic() + 60
    while pool.state()["b"].tier == "disk" and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert pool.state()["a"].tier == "hbm" and not job.done()  # a kept generating, in HBM
    assert pool.state()["b"].tier == "dram"  # b came as far as the budget allowed, without waiting
    assert not [w for _, n, w in pool.tiers.metrics.events if n == "a" and w.startswith("evict")]
    assert pool.tiers.peak_bytes[next(t for t in pool.tiers.budget if t.value == "hbm")] <= budget
    job.cancel()
    await pool.close()


def test_likely_expert_and_confident_category():
    from expert_registry.spec import Expert

    experts = {n: Expert(name=n, model="/m", capabilities=c) for n, c in
               (("x", {"math": 0.6}), ("y", {"math": 0.8}), ("z", {"general": 0.9}))}
    cmap = {"math": ["x", "y"], "general": ["z"]}
    assert hint_category("coe", {"math": 0.9, "general": 0.1}, 0.6) == "math"
    assert hint_category("coe", {"math": 0.5, "general": 0.5}, 0.6) is None  # not confident: no hint
    assert hint_category("coe/general", {"math": 0.9}, 0.6) == "general"  # a forced category is certain
    assert hint_category("x", {"math": 0.9}, 0.6) is None  # a named expert needs no guess
    assert likely_expert("math", experts, cmap) == "y"
    assert likely_expert("math", experts, cmap, allowed={"x"}) == "x"
    assert likely_expert("math", experts, cmap, residency={"x": 1.0}, residency_weight=0.3) == "x"
    assert likely_expert("coding", experts, cmap) is None
