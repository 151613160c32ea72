"""coe's :class:`~coe.engines.base.SamplingParams` → vLLM's ``SamplingParams`` keyword arguments.

Plain dicts, no vLLM import, so the translation is tested on CPU (tests/api/test_vllm_params.py);
``VLLMEngine._vllm_params`` builds the vLLM objects from them. Field names follow vLLM 0.24
(``structured_outputs=StructuredOutputsParams(...)``; older releases called it ``guided_decoding``).
"""

from __future__ import annotations

from typing import Any

from coe.engines.base import SamplingParams, TokenLogprob

#: fields copied as they are (same name and meaning in vLLM)
_SAME = ("n", "max_tokens", "temperature", "top_p", "seed", "ignore_eos", "presence_penalty", "frequency_penalty",
         "repetition_penalty", "min_p", "min_tokens", "include_stop_str_in_output", "skip_special_tokens",
         "spaces_between_special_tokens")
# ``truncate_prompt_tokens`` is not a SamplingParams field in vLLM 0.24 (the H200 GPU tests of
# 2026-11-29 failed on it): it is refused for every engine (coe.engines.features) until coe truncates.
#: optional fields passed only when set
_OPTIONAL = ("logit_bias", "stop_token_ids", "bad_words", "allowed_token_ids", "logprobs")


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` (without ``output_kind`` and structured outputs)."""
    kw: dict[str, Any] = {f: getattr(params, f) for f in _SAME}
    kw["stop"] = list(params.stop) or None
    if params.top_k not in (None, -1, 0):
        kw["top_k"] = params.top_k
    for f in _OPTIONAL:
        v = getattr(params, f)
        if v is not None and v != [] and v != {}:
            kw[f] = v
    return kw


def structured_kwargs(params: SamplingParams) -> dict[str, Any] | None:
    """Keyword arguments of vLLM's ``StructuredOutputsParams`` (None when the output is free text)."""
    s = params.structured
    if s is None:
        return None
    if s.json_schema is not None:
        return {"json": s.json_schema}
    if s.json_object:
        return {"json_object": True}
    if s.regex is not None:
        return {"regex": s.regex}
    if s.choice is not None:
        return {"choice": list(s.choice)}
    if s.grammar is not None:
        return {"grammar": s.grammar}
    return None


def token_logprobs(step: dict[int, Any], sampled: int, k: int, decode: Any) -> TokenLogprob:
    """One generated token's logprob and its top-``k`` from vLLM's per-step ``{token_id: Logprob}``
    (``Logprob`` has ``logprob``, ``rank`` and ``decoded_token``; ``decode`` is the fallback)."""

    def text(tid: int, lp: Any) -> str:
        t = getattr(lp, "decoded_token", None)
        return t if t is not None else decode(tid)

    top = sorted(((tid, lp) for tid, lp in step.items() if (getattr(lp, "rank", None) or 0) <= k and k > 0),
                 key=lambda kv: kv[1].logprob, reverse=True)[:k]
    me = step.get(sampled)
    return TokenLogprob(token=text(sampled, me) if me is not None else decode(sampled),
                        logprob=float(me.logprob) if me is not None else float("-inf"),
                        top=[(text(tid, lp), float(lp.logprob)) for tid, lp in top])
