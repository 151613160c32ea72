"""Decision 2 on real tiny models: out of memory and timeouts pass (retried with backoff, requests
fail fast meanwhile), corrupt files do not; and the HBM budget counting whole engine footprints."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import make_expert

from coe.engines.base import SamplingParams, Tier
from coe.engines.hf import HFEngine
from coe.engines.memory import EngineMemory
from coe.errors import ExpertLoadError, ExpertTransientError
from coe.pool import ExpertPool, PoolConfig
from coe.tiers import TierManager
from transformers import AutoModelForCausalLM  # noqa: F401 - imported here, not first inside a load that times out

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
MSG = [{"role": "user", "content": "Name a colour."}]


async def ask(pool, name) -> str:
    return "".join([c.text async for c in pool.generate(name, MSG, GREEDY)])


async def until(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_load_that_times_out_is_retried_and_heals(tiny_model_dir):
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=10**9, dram_budget_bytes=10**9, load_timeout_s=1e-4,
                                 retry_backoff_s=0.3, start_on_add=False))
    await pool.add_expert(make_expert("a", tiny_model_dir))
    with pytest.raises(ExpertTransientError, match="timed out"):
        await ask(pool, "a")
    st = pool.state()["a"]
    assert st.status == "unavailable" and st.retry_in_s > 0 and pool.residency_hint()["a"] == 0.0
    with pytest.raises(ExpertTransientError, match="retrying in"):  # fails fast during the backoff
        await ask(pool, "a")
    pool.tiers.load_timeout_s = 30.0  # whatever slowed the load has passed
    await until(lambda: pool.state()["a"].status == "ready" and pool.state()["a"].tier == "dram")  # retried alone
    assert await ask(pool, "a")
    assert pool.tiers.error_of("a") is None
    await pool.close()


async def test_out_of_memory_is_transient_and_corrupt_weights_are_permanent(tmp_path, tiny_model_dir):
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=10**9, dram_budget_bytes=10**9, retry_backoff_s=0.2,
                                 start_on_add=False))
    await pool.add_expert(make_expert("a", tiny_model_dir))
    eng = pool.engine("a")
    real_wake, calls = eng.to_hbm, []

    async def wake_oom():
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return await real_wake()

    eng.to_hbm = wake_oom  # the device was fuller than the budget thought, once
    with pytest.raises(ExpertTransientError, match="out of memory"):
        await ask(pool, "a")
    assert pool.tiers.error_of("a") is None and pool.tiers.charged("a")[Tier.HBM] == 0
    await asyncio.sleep(0.25)
    assert await ask(pool, "a") and len(calls) == 2

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    await pool.add_expert(make_expert("bad", bad))
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ExpertLoadError):
        await ask(pool, "bad")
    assert pool.state()["bad"].status == "failed" and pool.tiers.backoff_of("bad") is None
    await pool.close()


class _StartsOnDevice(HFEngine):
    """A real tiny model reporting a vLLM-shaped footprint: it starts on the device (load needs
    the whole footprint), holds a KV cache while awake and a context while asleep."""

    KV, CONTEXT = 3_000_000, 500_000

    def memory(self) -> EngineMemory:
        w = self.footprint_bytes()
        return EngineMemory(host_bytes=w, active_bytes=w + self.KV, idle_bytes=self.CONTEXT,
                            load_bytes=w + self.KV, measured=self.tier is not Tier.DISK)


async def test_hbm_budget_counts_whole_footprints_awake_and_asleep(tiny_model_dir):
    engines = [_StartsOnDevice(make_expert(n, tiny_model_dir)) for n in "abc"]  # three of one size
    big = max(e.memory().active_bytes for e in engines) + (64 << 10)  # estimate + slack for the measured size
    ctx = _StartsOnDevice.CONTEXT
    tm = TierManager(hbm_budget_bytes=big + ctx, dram_budget_bytes=10**9)  # one awake + one asleep
    for e in engines:
        tm.register(e.name, e)
    for name in ("a", "b", "a", "c", "b"):
        async with tm.acquire(name):
            # awake: weights + KV counted; a loaded engine asleep keeps its context counted
            assert tm.charged(name)[Tier.HBM] == tm.memory_of(name).active_bytes
            asleep = [n for n in "abc" if tm.tier_of(n) is Tier.DRAM]
            assert all(tm.charged(n)[Tier.HBM] == ctx for n in asleep) and len(asleep) <= 1
            assert tm.used[Tier.HBM] == tm.memory_of(name).active_bytes + ctx * len(asleep) <= tm.budget[Tier.HBM]
    assert tm.metrics.swaps.get("dram->disk", 0) >= 1  # a third engine could not keep its context: one was shut down
    assert tm.peak_bytes[Tier.HBM] <= tm.budget[Tier.HBM]
    assert tm.metrics.expert_swaps["a"]["dram->hbm"] == 2  # counted per expert as well as per direction
    for e in engines:
        await e.close()
