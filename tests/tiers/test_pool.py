"""ExpertPool on CPU with real tiny models + SmolLM2: swapping, batching, prefetch, failures."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from conftest import make_expert

from coe.engines.base import SamplingParams, Tier
from coe.errors import ExpertLoadError, ExpertNotServed, QueueFull
from coe.pool import ExpertPool, PoolConfig

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
MSG = [{"role": "user", "content": "Name a colour."}]


async def ask(pool, name, params=GREEDY, messages=MSG) -> tuple[str, float]:
    out = []
    async for c in pool.generate(name, messages, params):
        out.append(c.text)
    return "".join(out), time.monotonic()


async def sizes_of(experts) -> dict[str, int]:
    big = ExpertPool(PoolConfig(hbm_budget_bytes=10**12, dram_budget_bytes=10**12))
    for e in experts:
        await big.add_expert(e)
        async with big.tiers.acquire(e.name):  # loaded: the measured footprint the budgets will count
            pass
    s = {n: big.tiers.memory_of(n).active_bytes for n in big.experts()}
    await big.close()
    return s


@pytest.fixture
def three(tiny_model_dir, byte_model_dir, smollm_dir):
    return [make_expert("a", tiny_model_dir), make_expert("b", byte_model_dir), make_expert("s", smollm_dir)]


async def test_interleaved_requests_match_a_run_without_swapping(three):
    sizes = await sizes_of(three)
    order = ["a", "s", "b", "s", "a", "s"]

    async def run(hbm: int):
        pool = ExpertPool(PoolConfig(hbm_budget_bytes=hbm, dram_budget_bytes=10**12))
        for e in three:
            await pool.add_expert(e)
        seq = [(await ask(pool, n))[0] for n in order]  # one at a time: every step is a switch
        par = await asyncio.gather(*(ask(pool, n) for n in order))  # all at once: batched by expert
        m = pool.metrics()
        await pool.close()
        return seq, [t for t, _ in par], m

    ref_seq, ref_par, ref_m = await run(10**12)
    seq, par, m = await run(sizes["s"] + 1)  # "HBM" holds s alone, never s + a tiny
    assert seq == ref_seq and par == ref_par
    assert ref_seq == ref_par
    assert ref_m["swaps"]["dram->hbm"] == 3  # each expert loaded once, never evicted
    assert m["swaps"]["dram->hbm"] >= len(order)  # every switch in the sequential run swapped
    assert m["swaps"]["disk->dram"] == 3  # DRAM held all: weights read from disk once each
    assert m["peak_bytes"]["hbm"] <= sizes["s"] + 1
    assert m["bytes"]["hbm"] <= m["budget_bytes"]["hbm"]


async def test_pool_batches_requests_of_one_expert(byte_model_dir):
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=10**9, dram_budget_bytes=10**9, max_batch_size=8))
    await pool.add_expert(make_expert("b", byte_model_dir))
    await ask(pool, "b")  # warm: loaded and resident
    msgs = [[{"role": "user", "content": "y" * n}] for n in range(1, 7)]
    await asyncio.gather(*(ask(pool, "b", messages=m) for m in msgs))
    assert max(pool.metrics()["batch_sizes"]["b"]) > 1
    await pool.close()


async def test_demand_policy_prefetches_while_current_expert_generates(byte_model_dir, smollm_dir):
    exps = [make_expert("b", byte_model_dir, max_context=8192), make_expert("s", smollm_dir)]
    sizes = await sizes_of(exps)
    for policy in ("lru", "demand"):
        pool = ExpertPool(PoolConfig(hbm_budget_bytes=sizes["s"] + 1, dram_budget_bytes=10**12, policy=policy,
                                     start_on_add=False))  # only the hint may start s
        for e in exps:
            await pool.add_expert(e)
        b_engine = pool.engine("b")
        t_start = time.monotonic()
        job = asyncio.create_task(ask(pool, "b", params=SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True)))
        while pool.state()["b"].tier != "hbm" or b_engine.stats().steps < 2:
            await asyncio.sleep(0.01)
        pool.hint_demand({"s": 3})  # the router expects requests for s
        deadline = time.monotonic() + (1.0 if policy == "lru" else 60.0)
        while pool.state()["s"].tier == "disk" and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        steps = b_engine.stats().steps
        await asyncio.sleep(0.2)
        assert not job.done() and b_engine.stats().steps > steps  # b was generating all along
        t_b_still_running = time.monotonic()
        job.cancel()
        ev = {(n, what): t for t, n, what in pool.tiers.metrics.events}
        if policy == "lru":
            assert ("s", "disk->dram start") not in ev  # LRU does not act on hints
            assert pool.state()["s"].tier == "disk"
        else:
            # s's weights were read from disk while b was generating (HBM was leased by b: s went to DRAM)
            assert t_start < ev[("s", "disk->dram start")] < ev[("s", "disk->dram done")] < t_b_still_running
            assert pool.state()["s"].tier == "dram"
            assert (await ask(pool, "s"))[0]
            assert pool.metrics()["swaps"]["disk->dram"] == 2  # s was not read from disk again
        await pool.close()


async def test_failed_expert_fails_its_requests_while_others_serve(tmp_path, tiny_model_dir, byte_model_dir):
    gone, bad = tmp_path / "gone", tmp_path / "bad"
    shutil.copytree(byte_model_dir, gone)
    shutil.copytree(byte_model_dir, bad)
    # start_on_add off: the files must vanish between the add and the first load, which a background
    # start begun at add time could otherwise win
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=10**9, dram_budget_bytes=10**9, start_on_add=False))
    for e in [make_expert("a", tiny_model_dir), make_expert("gone", gone), make_expert("bad", bad)]:
        await pool.add_expert(e)
    shutil.rmtree(gone)  # files vanish after the expert was added
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)  # corrupt
    results = await asyncio.gather(ask(pool, "gone"), ask(pool, "a"), ask(pool, "bad"), return_exceptions=True)
    assert isinstance(results[0], ExpertLoadError) and "does not exist" in str(results[0])
    assert isinstance(results[2], ExpertLoadError) and "model.safetensors" in str(results[2])
    assert isinstance(results[1], tuple) and results[1][0]
    st = pool.state()
    assert st["gone"].status == "failed" and "does not exist" in st["gone"].error
    assert st["bad"].status == "failed" and st["a"].status == "ready"
    with pytest.raises(ExpertLoadError):  # later requests fail fast with the same reason
        await ask(pool, "gone")
    assert (await ask(pool, "a"))[0]
    assert pool.residency_hint()["gone"] == 0.0 and pool.residency_hint()["a"] == 1.0
    await pool.close()


async def test_cancelling_a_stream_frees_the_slot(tiny_model_dir, byte_model_dir):
    exps = [make_expert("a", tiny_model_dir, max_context=8192), make_expert("b", byte_model_dir)]
    sizes = await sizes_of(exps)
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=max(sizes.values()) + 1, dram_budget_bytes=10**9))
    for e in exps:
        await pool.add_expert(e)
    agen = pool.generate("a", MSG, SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True))
    async for _ in agen:
        break
    await agen.aclose()
    # b needs a's HBM: it is only granted once a's cancelled request released its lease
    text, _ = await asyncio.wait_for(ask(pool, "b"), 30)
    assert text
    assert pool.state()["a"].in_flight == 0
    assert pool.engine("a").stats().cancelled == 1
    await pool.close()


async def test_queue_full_and_starvation_bound(tiny_model_dir, byte_model_dir):
    exps = [make_expert("a", tiny_model_dir), make_expert("b", byte_model_dir)]
    sizes = await sizes_of(exps)
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=max(sizes.values()) + 1, dram_budget_bytes=10**9,
                                 max_queue_per_expert=3, max_wait_ms=150, max_batch_size=1))
    for e in exps:
        await pool.add_expert(e)
    # Hold b resident and leased: a's requests queue up.
    lease = pool.tiers.acquire("b")
    await lease.__aenter__()
    waiting = [asyncio.create_task(ask(pool, "a")) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert pool.state()["a"].queue_depth == 3
    with pytest.raises(QueueFull, match="'a'"):
        await ask(pool, "a")
    await lease.__aexit__(None, None, None)
    await asyncio.gather(*waiting)
    # Starvation bound: a steady stream for a, one request for b; b is served long before the stream ends.
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    done: list[tuple[str, float]] = []

    async def stream_a():
        for _ in range(12):
            await asyncio.sleep(0.02)
            try:
                done.append(("a", (await ask(pool, "a", params=params))[1]))
            except QueueFull:
                pass

    async def one_b():
        await asyncio.sleep(0.1)
        done.append(("b", (await ask(pool, "b", params=params))[1]))

    await asyncio.gather(stream_a(), stream_a(), one_b())
    t_b = next(t for n, t in done if n == "b")
    assert sum(1 for n, t in done if n == "a" and t > t_b) >= 3  # a kept going after b was served
    await pool.close()


async def test_remove_lets_in_flight_finish_then_frees_memory(byte_model_dir):
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=10**9, dram_budget_bytes=10**9))
    await pool.add_expert(make_expert("b", byte_model_dir))
    job = asyncio.create_task(ask(pool, "b", params=SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)))
    while pool.state()["b"].in_flight == 0:
        await asyncio.sleep(0.01)
    await pool.remove_expert("b")
    text, _ = await job
    assert len(text) > 0 and job.done()
    assert pool.experts() == []
    assert pool.metrics()["bytes"] == {"hbm": 0, "dram": 0}
    with pytest.raises(ExpertNotServed):
        await ask(pool, "b")
    await pool.close()


async def test_residency_hint_reports_tiers(tiny_model_dir, byte_model_dir):
    exps = [make_expert("a", tiny_model_dir), make_expert("b", byte_model_dir)]
    sizes = await sizes_of(exps)
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=max(sizes.values()) + 1, dram_budget_bytes=10**9))
    for e in exps:
        await pool.add_expert(e)
    assert pool.residency_hint() == {"a": 0.0, "b": 0.0}
    await ask(pool, "a")
    await ask(pool, "b")
    assert pool.residency_hint() == {"a": 0.5, "b": 1.0}  # a was evicted to DRAM by b
    assert pool.state()["a"].tier == Tier.DRAM.value
    await pool.close()


async def test_starving_expert_preempts_one_session_while_the_other_keeps_admitting(tiny_model_dir, byte_model_dir):
    """HBM for two of three experts, both slots busy with long generations. A third expert's
    requests starve: the scheduler closes only the least-demanded session (b), the other (a) keeps
    taking new requests, and c's queued requests are served together as one batch once b drains."""
    exps = [make_expert("a", tiny_model_dir, max_context=8192), make_expert("b", byte_model_dir, max_context=8192),
            make_expert("c", tiny_model_dir, max_context=8192)]
    sizes = await sizes_of(exps)
    two = sorted(sizes.values())[-2:]
    assert sum(sizes.values()) > sum(two)  # the three never fit together
    pool = ExpertPool(PoolConfig(hbm_budget_bytes=sum(two), dram_budget_bytes=10**9, max_wait_ms=300, max_batch_size=8))
    for e in exps:
        await pool.add_expert(e)
    long = SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True)
    hold_a = asyncio.create_task(ask(pool, "a", params=long))
    hold_b = asyncio.create_task(ask(pool, "b", params=long))
    try:
        while pool.state()["a"].in_flight == 0 or pool.state()["b"].in_flight == 0:
            await asyncio.sleep(0.01)
        for _ in range(3):  # a is the busier expert
            await ask(pool, "a")
        cs = [asyncio.create_task(ask(pool, "c")) for _ in range(3)]
        deadline = time.monotonic() + 30
        while not any("c" in r for _, r in pool.decisions) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        reasons = [r for _, r in pool.decisions if "c" in r]
        assert reasons and reasons[0]["b"] == "closed for c"  # the least-demanded session is the victim
        # a keeps admitting while c waits for b's in-flight request to finish
        text, _ = await asyncio.wait_for(ask(pool, "a"), 30)
        assert text and not any(t.done() for t in cs)
        assert pool.state()["c"].queue_depth == 3 and pool.state()["b"].tier == "hbm"
        hold_b.cancel()  # b's last request ends (here: its client goes away): b drains, c swaps in
        await asyncio.wait_for(asyncio.gather(*cs), 60)
        c_in = [t for t, n, what in pool.tiers.metrics.events if n == "c" and what == "dram->hbm start"]
        assert len(c_in) == 1  # c's three requests were served in one residency
        assert not any(r.get("a", "").startswith("closed") for _, r in pool.decisions)  # a never closed
        assert pool.state()["b"].tier == "dram" and not hold_a.done()
        m = pool.metrics()
        assert m["peak_bytes"]["hbm"] <= m["budget_bytes"]["hbm"]
    finally:
        hold_a.cancel()
        hold_b.cancel()
        await pool.close()


async def test_engines_handed_in_outlive_the_pool_that_served_them(byte_model_dir):
    """The serving bench's way of running several pool set-ups over one set of started engines:
    the pool builds engines through the factory it is given, and ``close(close_engines=False)``
    leaves them loaded for the next pool, which serves the same greedy output from them."""
    from coe.engines import create_engine

    built = []

    def factory(expert, **pool_settings):
        built.append(create_engine(expert, **pool_settings))
        return built[-1]

    ex = make_expert("b", byte_model_dir)
    first = ExpertPool(PoolConfig(hbm_budget_bytes=10**12, dram_budget_bytes=10**12), engine_factory=factory)
    await first.add_expert(ex)
    before, _ = await ask(first, "b")
    await first.close(close_engines=False)
    (engine,) = built
    assert engine.tier is not Tier.DISK  # still loaded: nothing was shut down

    second = ExpertPool(PoolConfig(hbm_budget_bytes=10**12, dram_budget_bytes=10**12),
                        engine_factory=lambda expert, **_: engine)
    await second.add_expert(ex)
    assert second.engine("b") is engine and (await ask(second, "b"))[0] == before
    await second.close()
    assert engine.tier is Tier.DISK and len(built) == 1
