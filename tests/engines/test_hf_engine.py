"""The hf engine on CPU: streaming, stop/seed/max_tokens, batching, cancellation, tier moves, GGUF cache."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import make_expert, take_tokens

from coe.engines.base import SamplingParams, Tier
from coe.engines.hf import HFEngine
from coe.errors import ExpertLoadError

MSG = [{"role": "user", "content": "Write one sentence about the sea."}]


async def hot(expert) -> HFEngine:
    eng = HFEngine(expert)
    await eng.load()
    await eng.to_hbm()
    return eng


async def collect(eng, messages, params):
    chunks = []
    async for c in eng.generate(messages, params):
        chunks.append((time.monotonic(), c))
    return chunks


def text_of(chunks) -> str:
    return "".join(c.text for _, c in chunks)


async def test_streams_incrementally_and_respects_max_tokens(tiny_model_dir):
    eng = await hot(make_expert("tiny", tiny_model_dir))
    chunks = await collect(eng, MSG, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert len(chunks) > 5  # deltas as tokens come, not one blob at the end
    assert chunks[-1][1].finish_reason == "length"
    assert chunks[-1][1].completion_tokens == 24
    assert chunks[-1][1].prompt_tokens == eng.count_prompt_tokens(MSG)
    assert all(c.finish_reason is None for _, c in chunks[:-1])
    assert sum(len(c.token_ids) for _, c in chunks) == 24
    await eng.close()


async def test_seeded_sampling_is_reproducible(tiny_model_dir):
    eng = await hot(make_expert("tiny", tiny_model_dir))
    p = dict(max_tokens=16, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = text_of(await collect(eng, MSG, SamplingParams(seed=7, **p)))
    b = text_of(await collect(eng, MSG, SamplingParams(seed=7, **p)))
    c = text_of(await collect(eng, MSG, SamplingParams(seed=8, **p)))
    assert a == b
    assert a != c
    await eng.close()


async def test_stop_string_truncates(smollm_dir):
    eng = await hot(make_expert("smol", smollm_dir))
    full = text_of(await collect(eng, MSG, SamplingParams(max_tokens=12, temperature=0)))
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = await collect(eng, MSG, SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
    assert text_of(cut) == full[: full.index(stop)]
    assert cut[-1][1].finish_reason == "stop"
    await eng.close()


async def test_concurrent_requests_are_batched_with_left_padding(byte_model_dir):
    eng = await hot(make_expert("byte", byte_model_dir))
    prompts = [[{"role": "user", "content": "x" * n}] for n in (3, 17, 40, 9)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [text_of(await collect(eng, m, params)) for m in prompts]
    assert eng.stats().batch_sizes == [1, 1, 1, 1]
    together = await asyncio.gather(*(collect(eng, m, params) for m in prompts))
    assert max(eng.stats().batch_sizes) > 1  # really batched
    assert [text_of(c) for c in together] == alone  # padding does not change results
    await eng.close()


async def test_new_request_joins_a_running_batch(byte_model_dir):
    eng = await hot(make_expert("byte", byte_model_dir))
    long_msgs = [{"role": "user", "content": "a long answer please"}]
    short_msgs = [{"role": "user", "content": "short"}]
    long_p = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    short_p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    long_alone = text_of(await collect(eng, long_msgs, long_p))
    short_alone = text_of(await collect(eng, short_msgs, short_p))
    long_job = asyncio.create_task(collect(eng, long_msgs, long_p))
    while eng.stats().steps < 2 + 120 + 8 + 10:  # the long request is decoding
        await asyncio.sleep(0.005)
    short = await collect(eng, short_msgs, short_p)
    assert not long_job.done()  # the short one did not wait for the long batch to finish
    assert eng.stats().joined == 1
    assert text_of(short) == short_alone
    assert text_of(await long_job) == long_alone  # joining did not disturb the running row
    await eng.close()


async def test_cancellation_stops_compute(byte_model_dir):
    eng = await hot(make_expert("byte", byte_model_dir, max_context=8192))
    got = await take_tokens(eng.generate(MSG, SamplingParams(max_tokens=5000, temperature=0, ignore_eos=True)), 3)
    await asyncio.sleep(0.3)
    steps = eng.stats().steps
    await asyncio.sleep(0.3)
    assert eng.stats().steps == steps  # the loop stopped: no forward passes after cancel
    assert steps < 1000
    assert eng.stats().cancelled == 1
    # the engine still serves
    assert text_of(await collect(eng, MSG, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    await eng.close()


async def test_tier_moves_keep_outputs_and_free_the_model(byte_model_dir):
    eng = HFEngine(make_expert("byte", byte_model_dir))
    assert eng.tier is Tier.DISK
    est = eng.footprint_bytes()
    rec = await eng.load()
    assert eng.tier is Tier.DRAM and rec.nbytes == eng.footprint_bytes()
    assert abs(est - rec.nbytes) / rec.nbytes < 0.05  # header estimate ~ real size
    await eng.to_hbm()
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    before = text_of(await collect(eng, MSG, p))
    for _ in range(3):
        await eng.to_dram()
        assert all(t.is_meta for t in eng._model.parameters())  # nothing materialised in "HBM"
        await eng.to_hbm()
    assert text_of(await collect(eng, MSG, p)) == before
    await eng.unload()
    assert eng.tier is Tier.DISK and eng._host is None


async def test_expert_settings_are_respected(tiny_model_dir):
    from expert_registry.spec import GenerationDefaults

    ex = make_expert("tiny", tiny_model_dir, system_prompt="You are terse.",
                     generation=GenerationDefaults(max_tokens=5, temperature=0.0))
    eng = await hot(ex)
    assert "You are terse." in eng.apply_chat_template(MSG)
    chunks = await collect(eng, MSG, SamplingParams(ignore_eos=True))  # defaults from the expert
    assert chunks[-1][1].completion_tokens == 5
    over = make_expert("tiny2", tiny_model_dir, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}>")
    assert HFEngine(over).apply_chat_template(MSG) == "[Write one sentence about the sea.]>"
    await eng.close()


async def test_corrupt_or_missing_files_give_clear_load_error(tmp_path: Path, byte_model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(byte_model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ExpertLoadError, match="bad"):
        await HFEngine(make_expert("bad", bad)).load()
    gone = tmp_path / "gone"
    shutil.copytree(byte_model_dir, gone)
    eng = HFEngine(make_expert("gone", gone))
    eng.footprint_bytes()
    shutil.rmtree(gone)
    with pytest.raises(ExpertLoadError, match="does not exist"):
        await eng.load()


def test_gguf_is_converted_once_into_the_models_cache(smollm2_gguf, smollm_dir, coe_home):
    from coe.engines.sources import ensure_converted, gguf_cache_dir

    assert smollm_dir == gguf_cache_dir(smollm2_gguf)
    assert smollm_dir.resolve().is_relative_to((coe_home / "models").resolve())
    stamp = (smollm_dir / ".complete").stat().st_mtime_ns
    t0 = time.monotonic()
    assert ensure_converted(smollm2_gguf) == smollm_dir
    assert time.monotonic() - t0 < 1.0  # no second conversion (that takes ~40 s)
    assert (smollm_dir / ".complete").stat().st_mtime_ns == stamp
    assert (smollm_dir / "tokenizer_config.json").is_file()
