"""TierManager with real hf engines on CPU: budgets, leases, shared loads, refusals."""

from __future__ import annotations

import asyncio

import pytest
from conftest import make_expert

from coe.engines.base import Tier
from coe.engines.hf import HFEngine
from coe.errors import ExpertTooLarge
from coe.tiers import TierManager


def manager(experts, hbm_fits_one: bool = True, dram: int | None = None, policy: str = "lru"):
    engines = [HFEngine(e) for e in experts]
    sizes = [e.footprint_bytes() for e in engines]
    hbm = max(sizes) + min(sizes) - 1 if hbm_fits_one else sum(sizes) * 2
    tm = TierManager(hbm, dram if dram is not None else sum(sizes) * 2, policy)
    for e, s in zip(engines, sizes):
        tm.register(e.name, e, s)
    return tm, engines


async def test_lease_blocks_eviction_and_budget_holds(tiny_model_dir, byte_model_dir):
    tm, (a, b) = manager([make_expert("a", tiny_model_dir), make_expert("b", byte_model_dir)])
    async with tm.acquire("a"):
        lease_b = tm.acquire("b")
        waiting = asyncio.create_task(lease_b.__aenter__())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # b needs a's space, a is leased
        assert a.tier is Tier.HBM
        assert b.tier is Tier.DRAM  # b's host copy was loaded meanwhile (DRAM has room)
    await asyncio.wait_for(waiting, 10)
    assert b.tier is Tier.HBM and a.tier is Tier.DRAM
    assert tm.leases("b") == 1
    await lease_b.__aexit__(None, None, None)
    assert tm.leases("b") == 0
    assert tm.peak_bytes[Tier.HBM] <= tm.budget[Tier.HBM]
    assert tm.peak_bytes[Tier.DRAM] <= tm.budget[Tier.DRAM]
    assert tm.metrics.swaps["hbm->dram"] == 1


async def test_concurrent_acquires_share_one_load(byte_model_dir):
    tm, (b,) = manager([make_expert("b", byte_model_dir)], hbm_fits_one=False)

    async def use():
        async with tm.acquire("b") as eng:
            await asyncio.sleep(0.05)
            return eng

    engines = await asyncio.gather(*(use() for _ in range(5)))
    assert all(e is b for e in engines)
    assert tm.metrics.swaps == {"disk->dram": 1, "dram->hbm": 1}


async def test_dram_budget_evicts_to_disk_lru(tiny_model_dir, byte_model_dir, smollm_dir):
    exps = [make_expert("a", tiny_model_dir), make_expert("b", byte_model_dir), make_expert("s", smollm_dir)]
    engines = [HFEngine(e) for e in exps]
    sizes = {e.name: e.footprint_bytes() for e in engines}
    # DRAM holds s plus one tiny; HBM holds s alone.
    tm = TierManager(sizes["s"] + 1, sizes["s"] + max(sizes["a"], sizes["b"]) + 1, "lru")
    for e in engines:
        tm.register(e.name, e, sizes[e.name])
    for name in ["a", "b", "s", "a"]:
        async with tm.acquire(name):
            assert tm.used[Tier.HBM] <= tm.budget[Tier.HBM]
    a, b, s = engines
    assert a.tier is Tier.HBM
    assert s.tier is Tier.DRAM  # more recently used than b
    assert b.tier is Tier.DISK  # least recently used: dropped to disk
    assert tm.peak_bytes[Tier.DRAM] <= tm.budget[Tier.DRAM]
    assert tm.metrics.swaps["dram->disk"] >= 1


def test_too_large_is_refused_when_added(smollm_dir):
    eng = HFEngine(make_expert("s", smollm_dir))
    tm = TierManager(hbm_budget_bytes=50_000_000, dram_budget_bytes=10**10)
    with pytest.raises(ExpertTooLarge, match=r"'s' needs 0\.\d+ GB but the HBM budget"):
        tm.register("s", eng, eng.footprint_bytes())
