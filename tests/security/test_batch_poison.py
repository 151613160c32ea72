"""High 1 of issue 24: one request poisoned a batch.

``"temperature": 1e-38`` passed the schema (``0 <= t <= 2``); the hf engine divided the logits by
it, they overflowed to ``inf``, softmax gave NaN and ``torch.multinomial`` raised. The exception
left the batch loop: every request of the batch got it (another tenant's stream ended with
``internal_error``), and the requests that had joined the running batch mid-way were never answered
at all (their clients gave up after 120 s).

Now a temperature below vLLM's ``_SAMPLING_EPS`` (1e-5) is greedy, as in vLLM; a sampling failure
fails only its own request (``RequestError``, code ``sampling_failed``); a batch that fails answers
every request it ever held, joiners included; numerically unusable values of the other sampling
fields are a 400 naming the field. These replays drive the real hf engine (tiny random Llama) and
the real service; each fails without the fix (errors for the co-batched requests, or a timeout)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from conftest import make_expert

from coe.api.protocol import ChatCompletionRequest
from coe.engines.base import GenerationChunk, SamplingParams
from coe.engines.hf import HFEngine
from coe.errors import RequestError
from expert_registry.spec import GenerationDefaults
from security_helpers import HELLO, err

pytestmark = pytest.mark.timeout(300)

A = [{"role": "user", "content": "a long answer please"}]
B = [{"role": "user", "content": "short"}]
C = [{"role": "user", "content": "write about the sea"}]
#: below float32's range once divided into the logits: ``inf`` logits, NaN probabilities (the report's
#: 1e-38 overflows a real model's logits; this tiny random model's are small, so 1e-40 does it here)
POISON_T = 1e-40
#: a seed the patched ``torch.multinomial`` refuses (a sampling failure of one request only)
BAD_SEED = 666
WAIT_S = 60.0  # no request may wait longer than this (the report's joiners waited forever)


async def hot(expert) -> HFEngine:
    eng = HFEngine(expert)
    await eng.load()
    await eng.to_hbm()
    return eng


async def run(eng: HFEngine, messages, params: SamplingParams, timeout: float = WAIT_S) -> list[GenerationChunk]:
    """The whole stream of one request; a ``TimeoutError`` if it is left waiting."""

    async def go() -> list[GenerationChunk]:
        return [c async for c in eng.generate(messages, params)]

    return await asyncio.wait_for(go(), timeout)


def text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def sampled(n: int, seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, seed=seed, ignore_eos=True)


def unchecked(n: int, temperature: float) -> SamplingParams:
    """A request with a temperature that skipped validation, as an expert's ``generation`` default
    reaches the engine (``with_defaults`` copies it in unvalidated; the registry takes 0..2)."""
    return SamplingParams.model_construct(**{**greedy(n).model_dump(), "temperature": temperature})


async def wait_decoding(eng: HFEngine, steps: int) -> None:
    """Until the running batch has made ``steps`` more forward passes."""
    target = eng.stats().steps + steps
    while eng.stats().steps < target:
        await asyncio.sleep(0.002)


def refuse_bad_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.multinomial`` fails for the generator seeded with :data:`BAD_SEED` only: one
    request's sampling raises, the way NaN probabilities made it raise."""
    real = torch.multinomial

    def multinomial(probs, n, *a, generator=None, **kw):
        if generator is not None and generator.initial_seed() == BAD_SEED:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(probs, n, *a, generator=generator, **kw)

    monkeypatch.setattr(torch, "multinomial", multinomial)


# ---- the engine ---------------------------------------------------------------------------------
async def test_a_tiny_temperature_is_greedy_and_its_batch_mates_finish(byte_model_dir):
    """The report's request (a request temperature, and the same value as an expert default) in
    one batch with a greedy and a sampled request: all four finish; the tiny ones greedily."""
    eng = await hot(make_expert("byte", byte_model_dir, generation=GenerationDefaults(temperature=1e-38)))
    ref_a, ref_b = text(await run(eng, A, greedy(16))), text(await run(eng, B, greedy(16)))
    default_t = SamplingParams(max_tokens=16, ignore_eos=True)  # temperature from the expert: 1e-38
    got = await asyncio.gather(run(eng, A, unchecked(16, POISON_T)), run(eng, B, default_t),
                               run(eng, A, greedy(16)), run(eng, C, sampled(16, 3)), return_exceptions=True)
    assert not [g for g in got if isinstance(g, BaseException)], got
    assert max(eng.stats().batch_sizes) > 1 or eng.stats().joined > 0  # they really shared a batch
    assert [text(g) for g in got[:3]] == [ref_a, ref_b, ref_a]
    assert all(g[-1].finish_reason == "length" and g[-1].completion_tokens == 16 for g in got)
    assert SamplingParams(temperature=1e-38).temperature == 0.0  # what the ingress builds
    await eng.close()


async def test_a_poison_request_joining_a_running_batch_fails_nobody(byte_model_dir):
    """The report's hang: requests join a running batch, one of them with the poison temperature.
    The running request and both joiners are answered, with the same text as alone."""
    eng = await hot(make_expert("byte", byte_model_dir))
    long_ref = text(await run(eng, A, greedy(400)))
    short_ref = text(await run(eng, B, greedy(8)))
    long_job = asyncio.create_task(run(eng, A, greedy(400)))
    await wait_decoding(eng, 20)
    joined = await asyncio.gather(run(eng, B, unchecked(8, POISON_T)), run(eng, B, greedy(8)),
                                  return_exceptions=True)
    assert eng.stats().joined >= 1
    assert [text(j) if isinstance(j, list) else j for j in joined] == [short_ref, short_ref]
    assert text(await long_job) == long_ref
    await eng.close()


async def test_a_sampling_failure_fails_only_its_own_request(byte_model_dir, monkeypatch):
    """One request's sampling raises (first in a fresh batch, then as a joiner of a running one):
    that request gets a typed ``RequestError``; its batch mates finish exactly as alone."""
    eng = await hot(make_expert("byte", byte_model_dir))
    ref_b = text(await run(eng, B, greedy(12)))
    long_ref = text(await run(eng, A, greedy(400)))
    refuse_bad_seed(monkeypatch)
    got = await asyncio.gather(run(eng, A, sampled(12, BAD_SEED)), run(eng, B, greedy(12)),
                               run(eng, C, sampled(12, 5)), return_exceptions=True)
    assert isinstance(got[0], RequestError) and got[0].code == "sampling_failed", got[0]
    assert isinstance(got[1], list) and text(got[1]) == ref_b, got[1]
    assert isinstance(got[2], list) and got[2][-1].completion_tokens == 12, got[2]

    long_job = asyncio.create_task(run(eng, A, greedy(400)))
    await wait_decoding(eng, 20)
    joined = await asyncio.gather(run(eng, C, sampled(12, BAD_SEED)), run(eng, B, greedy(12)),
                                  return_exceptions=True)
    assert eng.stats().joined >= 1
    assert isinstance(joined[0], RequestError) and joined[0].code == "sampling_failed", joined[0]
    assert isinstance(joined[1], list) and text(joined[1]) == ref_b, joined[1]
    assert text(await long_job) == long_ref  # the running row never noticed
    await eng.close()


async def test_a_failed_batch_answers_every_request_it_held_joiners_included(byte_model_dir, monkeypatch):
    """A failure of the whole batch (here the forward pass raises once requests have joined, as a
    device fault would) reaches every request of the batch, joiners included: none is left waiting.
    The engine serves the next request."""
    eng = await hot(make_expert("byte", byte_model_dir))
    model = eng._model
    assert model is not None
    real_forward = model.forward

    def forward(*a, **kw):
        if eng.stats().joined:
            raise RuntimeError("simulated device fault")
        return real_forward(*a, **kw)

    monkeypatch.setattr(model, "forward", forward)
    long_job = asyncio.create_task(run(eng, A, greedy(400)))
    await wait_decoding(eng, 20)
    joined = await asyncio.gather(run(eng, B, greedy(8)), run(eng, C, greedy(8)), return_exceptions=True)
    results = [*joined, *(await asyncio.gather(long_job, return_exceptions=True))]
    assert not [r for r in results if isinstance(r, asyncio.TimeoutError)], results  # nobody hung
    assert all(isinstance(r, RuntimeError) and "simulated" in str(r) for r in results), results
    monkeypatch.setattr(model, "forward", real_forward)
    assert text(await run(eng, B, greedy(4)))
    await eng.close()


# ---- the schema -----------------------------------------------------------------------------------
def _body(extra: str) -> dict:
    """A request body parsed the way the ingress parses it (Python's json: ``NaN``, ``1e999`` = inf)."""
    return json.loads('{"messages": [{"role": "user", "content": "hi"}], ' + extra + "}")


@pytest.mark.parametrize("extra, param", [
    ('"temperature": 1e999', "temperature"), ('"temperature": NaN', "temperature"),
    ('"top_p": NaN', "top_p"), ('"top_p": -1e-300', "top_p"),
    ('"presence_penalty": -Infinity', "presence_penalty"), ('"frequency_penalty": NaN', "frequency_penalty"),
    ('"repetition_penalty": 1e-30', "repetition_penalty"), ('"repetition_penalty": NaN', "repetition_penalty"),
    ('"min_p": NaN', "min_p"), ('"logit_bias": {"5": 1e999}', "logit_bias"),
    ('"top_k": 100000000000000000000000000', "top_k"), ('"min_tokens": 100000000000000000000', "min_tokens"),
])
def test_unusable_numbers_are_refused_by_name(extra, param):
    with pytest.raises(ValueError) as info:
        req = ChatCompletionRequest.model_validate(_body(extra))
        req.check_supported()
        req.to_sampling_params()
    errors = getattr(info.value, "errors", None)
    where = errors()[0]["loc"][0] if errors else getattr(info.value, "param", None)
    assert where == param, info.value


def test_a_tiny_temperature_or_top_p_is_accepted_and_safe():
    """Below 1e-5 a temperature is greedy (as vLLM treats it); a tiny ``top_p`` keeps the top token."""
    for t in (1e-38, 1e-300, 5e-324, 9e-6):
        assert ChatCompletionRequest.model_validate(_body(f'"temperature": {t}')).to_sampling_params().temperature == 0
    assert ChatCompletionRequest.model_validate(_body('"temperature": 1e-5')).to_sampling_params().temperature == 1e-5
    assert ChatCompletionRequest.model_validate(_body('"top_p": 1e-300')).to_sampling_params().top_p == 1e-300


# ---- the service ----------------------------------------------------------------------------------
async def _stream(c: httpx.AsyncClient, **body) -> tuple[str, list[dict]]:
    """(text, error events) of one streamed chat completion; it must end with ``[DONE]``."""
    out, errors, lines = "", [], []
    async with c.stream("POST", "/v1/chat/completions", json={"stream": True, **body}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
    assert lines and lines[-1] == "[DONE]", lines
    for ln in lines[:-1]:
        item = json.loads(ln)
        if "error" in item:
            errors.append(item["error"])
        for ch in item.get("choices") or []:
            out += (ch.get("delta") or {}).get("content") or ""
    return out, errors


async def test_over_http_the_poison_request_is_greedy_and_other_tenants_finish(serve_app):
    """Over the real service: the poison requests stream a greedy answer, the concurrent requests
    of other clients to the same expert finish without an error event, and nothing waits."""
    msg = [{"role": "user", "content": "Tell me about the sea."}]
    async with httpx.AsyncClient(base_url=serve_app.base, timeout=WAIT_S) as c:
        ref, errs = await _stream(c, model="tiny-a", messages=msg, max_tokens=24, temperature=0)
        assert not errs and ref
        got = await asyncio.wait_for(asyncio.gather(
            _stream(c, model="tiny-a", messages=msg, max_tokens=24, temperature=1e-300),
            _stream(c, model="tiny-a", messages=msg, max_tokens=24, temperature=1e-38),
            *(_stream(c, model="tiny-a", messages=HELLO, max_tokens=24, temperature=1.0, seed=s) for s in (1, 2)),
            _stream(c, model="tiny-a", messages=HELLO, max_tokens=24)), WAIT_S)
    assert [e for _, e in got] == [[]] * 5, got
    assert [t for t, _ in got[:2]] == [ref, ref]


def test_over_http_unusable_numbers_are_a_400_naming_the_field(serve_app, http):
    for extra, param in (('"temperature": 1e999', "temperature"), ('"top_p": NaN', "top_p"),
                         ('"repetition_penalty": 1e-30', "repetition_penalty"),
                         ('"top_k": 100000000000000000000000000', "top_k")):
        body = '{"model": "tiny-a", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], ' + extra + "}"
        r = http.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        e = err(r)
        assert e["param"] == param and e["code"] == "invalid_value", e
