"""vLLM engine on a real GPU (skipped without CUDA or without vLLM; never runs in CI).

Plain functions around ``asyncio.run`` so they also run where pytest-asyncio is not installed (the
lent GPU machine). One 1B-shaped dummy-weight engine per module keeps the start-up cost to one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (pip install 'coe[gpu]')"),
]


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, loop):
    from coe.engines.vllm_engine import VLLMEngine
    from coe.engines.vllm_models import PLAIN_TEMPLATE, build_dummy_folder
    from expert_registry.spec import EngineSettings, Expert

    folder = build_dummy_folder(tmp_path_factory.mktemp("m") / "llama-1b", "1b")
    ex = Expert(name="gpu-1b", model=str(folder), engine="vllm", dtype="bfloat16", max_context=1024,
                chat_template=PLAIN_TEMPLATE)
    eng = VLLMEngine(ex, device="cuda", max_batch_size=16,
                     settings=EngineSettings(gpu_memory_utilization=0.1, kv_cache_bytes=1 << 30, enforce_eager=True,
                                             load_format="dummy"),
                     dummy_init_seed=11, build_in_thread=False)
    loop.run_until_complete(eng.load())
    yield eng
    loop.run_until_complete(eng.close())


def _prompt(seed: int = 0):
    from coe.engines.vllm_models import word_prompt

    return [{"role": "user", "content": word_prompt(24, 128256, random.Random(seed))}]


async def _greedy(eng, n=16, seed=0):
    from coe.engines.base import SamplingParams

    ids, lps, chunks = [], [], []
    async for c, lp in eng.generate_with_logprobs(_prompt(seed), SamplingParams(max_tokens=n, temperature=0.0,
                                                                             ignore_eos=True), 5):
        ids.extend(c.token_ids)
        lps.extend(lp)
        chunks.append(c)
    return ids, lps, chunks


def test_generates_streams_and_reports_usage(engine, loop):
    from coe.engines.base import Tier

    async def go():
        await engine.to_hbm()
        assert engine.tier is Tier.HBM
        ids, _, chunks = await _greedy(engine, 16)
        other, _, _ = await _greedy(engine, 16, seed=1)
        await engine.to_dram()
        return ids, chunks, other

    ids, chunks, other = loop.run_until_complete(go())
    assert len(ids) == 16 and len(chunks) >= 2  # streamed, not one blob
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].prompt_tokens == 24 and chunks[-1].completion_tokens == 16
    assert "".join(c.text for c in chunks).split() == [f"w{i}" for i in ids if i >= 4]  # specials are skipped
    assert ids != other  # output depends on the input: the weights are not degenerate


def test_ten_switches_keep_greedy_outputs(engine, loop):
    async def go():
        await engine.set_switch_mode("pinned")
        await engine.to_hbm()
        before = await _greedy(engine)
        digest = await engine.weights_digest()
        for _ in range(10):
            await engine.to_dram()
            await engine.to_hbm()
        path = dict(engine.last_switch_info)
        after = await _greedy(engine)
        digest_after = await engine.weights_digest()
        await engine.to_dram()
        return before, after, digest, digest_after, path

    before, after, digest, digest_after, path = loop.run_until_complete(go())
    assert engine.fast_wake and "map_and_copy_s" in path, path  # the one-pass wake, not the fallback
    assert before[0] == after[0]
    assert before[1] == after[1]  # top-5 logprobs of every step, bit for bit
    assert digest == digest_after


def test_vllm_sleep_wake_baseline_keeps_outputs(engine, loop):
    async def go():
        await engine.set_switch_mode("pinned")
        await engine.to_hbm()
        before = await _greedy(engine)
        await engine.to_dram()
        await engine.set_switch_mode("sleep")
        for _ in range(3):
            await engine.to_hbm()
            await engine.to_dram()
        await engine.to_hbm()
        after = await _greedy(engine)
        await engine.to_dram()
        await engine.set_switch_mode("pinned")
        return before, after

    before, after = loop.run_until_complete(go())
    assert before[0] == after[0]


def test_cancelling_a_stream_stops_it(engine, loop):
    from coe.engines.base import SamplingParams

    async def go():
        await engine.to_hbm()
        agen = engine.generate(_prompt(), SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        got = 0
        async for c in agen:
            got += len(c.token_ids)
            if got >= 3:
                break
        await agen.aclose()
        ids, _, _ = await _greedy(engine, 4)  # the engine still serves
        await engine.to_dram()
        return got, ids

    got, ids = loop.run_until_complete(go())
    assert 3 <= got < 500 and len(ids) == 4


def test_auto_tool_choice_goes_through_the_parser(engine, loop):
    """tool_choice "auto" on vLLM: the expert's tool-call parser (vLLM's ``pythonic`` here: it needs no
    special tokens, which the dummy word-level tokenizer lacks) reads
    the answer (coe/engines/vllm_tools.py). Dummy weights write garbage, so the generation asserts
    the request path and the answer's shape; vLLM's parser itself is checked on a known text."""
    import json

    from coe.api.protocol import ChatCompletionRequest
    from coe.engines.vllm_tools import tool_parser

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    parse, _ = tool_parser("pythonic", engine.tokenizer, _prompt(), tools)
    content, calls = parse("[get_weather(city='Paris')]")
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id
    assert parse("w5 w6 w7") is None  # plain text stays text

    params = ChatCompletionRequest.model_validate({"messages": _prompt(), "tools": tools, "max_tokens": 12,
                                                   "temperature": 0.0}).to_sampling_params()
    assert params.tools_auto
    saved = engine.settings
    engine.settings = saved.model_copy(update={"tool_call_parser": "pythonic"})

    async def go():
        await engine.to_hbm()
        try:
            return [c async for c in engine.generate(_prompt(), params)]
        finally:
            await engine.to_dram()

    try:
        chunks = loop.run_until_complete(go())
    finally:
        engine.settings = saved
    assert len(chunks) == 1, chunks  # held back until the end, then sent whole
    last = chunks[0]
    assert last.finish_reason in ("stop", "length", "tool_calls") and 1 <= last.completion_tokens <= 12
    assert (last.finish_reason == "tool_calls") == bool(last.tool_calls)
    assert last.text or last.tool_calls
