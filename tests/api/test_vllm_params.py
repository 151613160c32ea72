"""CPU-side translation of coe's sampling parameters to vLLM's (the GPU run uses the same dicts)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from coe.api.protocol import ChatCompletionRequest
from coe.engines.vllm_params import sampling_kwargs, structured_kwargs, token_logprobs

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def sp(**kw):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **kw}).to_sampling_params()


def test_every_sampling_field_reaches_vllm_under_its_name():
    kw = sampling_kwargs(sp(max_tokens=9, temperature=0.5, top_p=0.9, seed=3, stop=["s"], n=2, presence_penalty=0.1,
                            frequency_penalty=0.2, repetition_penalty=1.2, top_k=5, min_p=0.05, min_tokens=2,
                            logit_bias={"11": -100}, logprobs=True, top_logprobs=4, stop_token_ids=[2],
                            include_stop_str_in_output=True, skip_special_tokens=False, bad_words=["x"],
                            allowed_token_ids=[1, 2], ignore_eos=True))
    assert kw == {"n": 2, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": 3, "ignore_eos": True,
                  "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.2, "min_p": 0.05,
                  "min_tokens": 2, "include_stop_str_in_output": True, "skip_special_tokens": False,
                  "spaces_between_special_tokens": True, "stop": ["s"], "top_k": 5,
                  "logit_bias": {11: -100.0}, "stop_token_ids": [2], "bad_words": ["x"], "allowed_token_ids": [1, 2],
                  "logprobs": 4}


def test_neutral_request_gives_vllm_defaults():
    kw = sampling_kwargs(sp())
    assert "top_k" not in kw and "logprobs" not in kw and "logit_bias" not in kw and kw["n"] == 1
    assert structured_kwargs(sp()) is None


def test_structured_outputs():
    assert structured_kwargs(sp(response_format={"type": "json_object"})) == {"json_object": True}
    assert structured_kwargs(sp(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema":
                                                  {"type": "integer"}}})) == {"json": {"type": "integer"}}
    assert structured_kwargs(sp(tools=TOOLS, tool_choice="required"))["json"]["type"] == "array"
    assert structured_kwargs(sp(guided_choice=["a", "b"])) == {"choice": ["a", "b"]}


def test_logprobs_of_a_step():
    Lp = lambda lp, rank, tok: SimpleNamespace(logprob=lp, rank=rank, decoded_token=tok)  # noqa: E731
    step = {5: Lp(-0.1, 1, "a"), 6: Lp(-2.0, 2, "b"), 9: Lp(-3.0, 7, "z")}
    t = token_logprobs(step, 9, 2, lambda i: f"<{i}>")
    assert (t.token, t.logprob, t.top) == ("z", -3.0, [("a", -0.1), ("b", -2.0)])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (GPU machine only)")
def test_vllm_accepts_the_translation():  # pragma: no cover - runs where vLLM is installed
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    p = sp(n=2, logprobs=True, top_logprobs=2, logit_bias={"3": 1}, response_format={"type": "json_object"})
    v = SamplingParams(**sampling_kwargs(p), structured_outputs=StructuredOutputsParams(**structured_kwargs(p)))
    assert v.n == 2 and v.logprobs == 2


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (GPU machine only)")
def test_field_list_matches_vllm():  # pragma: no cover - runs where vLLM is installed
    from vllm.entrypoints.openai.protocol import ChatCompletionRequest as V

    missing = set(V.model_fields) - set(ChatCompletionRequest.model_fields)
    assert not missing, f"vLLM fields coe does not declare (add to coe/api/protocol.py + docs/api.md): {missing}"
