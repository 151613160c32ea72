"""On a CUDA GPU: greedy outputs after ten swap cycles (through the pool and tier manager) equal the
outputs before any swap, the host copy is pinned, and leaving HBM frees the device copy."""

from __future__ import annotations

import pytest
import torch
from conftest import make_expert

from coe.engines.base import SamplingParams, Tier
from coe.pool import ExpertPool, PoolConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
MSG = [{"role": "user", "content": "Tell me about memory tiers."}]


async def ask(pool, name):
    ids = []
    async for c in pool.generate(name, MSG, GREEDY):
        ids.extend(c.token_ids)
    return ids


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory):
    from coe.engines.synthetic import build_llama_folder

    # a different shape and seed than byte_model_dir (no GGUF needed: runs on a bare GPU machine)
    return build_llama_folder(tmp_path_factory.mktemp("byte-llama-2"), seed=2, hidden_size=128, num_hidden_layers=3)


async def test_ten_swap_cycles_keep_greedy_outputs(second_model_dir, byte_model_dir):
    exps = [make_expert("a", second_model_dir, dtype="bfloat16", engine="hf"),
            make_expert("b", byte_model_dir, dtype="bfloat16", engine="hf")]
    big = ExpertPool(PoolConfig(device="cuda", hbm_budget_bytes=10**9, dram_budget_bytes=10**9))
    for e in exps:
        await big.add_expert(e)
    for n in ("a", "b"):  # loaded and run once: the sizes are measured, not estimated from the files
        await ask(big, n)
    sizes = {n: big.engine(n).memory().active_bytes for n in ("a", "b")}
    await big.close()
    pool = ExpertPool(PoolConfig(device="cuda", hbm_budget_bytes=max(sizes.values()) + 1, dram_budget_bytes=10**9))
    for e in exps:
        await pool.add_expert(e)
    before = {n: await ask(pool, n) for n in ("a", "b")}
    for _ in range(10):
        for n in ("a", "b"):
            assert await ask(pool, n) == before[n]
    m = pool.metrics()
    assert m["swaps"]["dram->hbm"] >= 20 and m["swaps"]["disk->dram"] == 2
    assert m["peak_bytes"]["hbm"] <= m["budget_bytes"]["hbm"]
    eng = pool.engine("b")
    assert eng.tier is Tier.HBM and eng._host.is_pinned()
    assert all(p.is_cuda for p in eng._model.parameters())
    await pool.tiers.demote("b", Tier.DRAM)
    assert eng._dev is None and all(p.is_meta for p in eng._model.parameters())
    await pool.close()


async def test_batching_and_joining_on_cuda(byte_model_dir):
    import asyncio

    from coe.engines.hf import HFEngine

    eng = HFEngine(make_expert("b", byte_model_dir, dtype="float32", engine="hf"), device="cuda")
    await eng.load()
    await eng.to_hbm()
    prompts = [[{"role": "user", "content": "z" * n}] for n in (2, 30, 11)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def run(m, delay=0.0):
        await asyncio.sleep(delay)
        ids = []
        async for c in eng.generate(m, params):
            ids.extend(c.token_ids)
        return ids

    alone = [await run(m) for m in prompts]
    staggered = await asyncio.gather(*(run(m, 0.02 * i) for i, m in enumerate(prompts)))
    assert staggered == alone
    assert eng.stats().joined >= 1 or max(eng.stats().batch_sizes) > 1
    await eng.close()
