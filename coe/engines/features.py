"""Which request features each engine can honour, and which engine an expert runs on.

A *feature* is the name of an OpenAI / vLLM chat request field set to a non-neutral value (see
:data:`coe.api.protocol.NEUTRAL`). The service treats a feature like context length: a hard routing
constraint. Experts whose engine cannot honour every feature a request needs are not candidates;
when none is left (or the client named such an expert) the answer is a 400
``unsupported_parameter`` naming the field. Nothing a client sends is silently dropped.

The ``hf`` engine samples with its own loop (temperature, top_p, stop, seed, max_tokens), so it
honours only the core fields every engine takes; ``vllm`` maps the rest onto vLLM's
``SamplingParams``, structured outputs and chat-template tools (``VLLMEngine._vllm_params``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from expert_registry.spec import Expert

#: fields every engine honours (the core of an OpenAI chat request)
CORE: frozenset[str] = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
    "stream", "stream_options", "user", "ignore_eos",
})

#: fields passed through to vLLM (sampling params, structured outputs, chat-template tools)
VLLM_FEATURES: frozenset[str] = frozenset({
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p", "min_tokens",
    "logit_bias", "logprobs", "top_logprobs", "stop_token_ids", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "bad_words", "allowed_token_ids",
    "response_format", "structured_outputs", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
    "reasoning_effort",
})

ENGINE_FEATURES: dict[str, frozenset[str]] = {
    "hf": CORE,
    "vllm": CORE | VLLM_FEATURES,
}


def engine_kind(expert: Expert, device: str) -> str:
    """The engine an expert runs on in a pool on ``device`` (``auto`` resolved the way
    :func:`coe.engines.create_engine` does: vLLM on CUDA where it is installed, else hf)."""
    kind = expert.engine
    if kind != "auto":
        return kind
    if str(device).startswith("cuda") and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def unsupported(kind: str, needed: Iterable[str]) -> list[str]:
    """The fields of ``needed`` that engine ``kind`` cannot honour (in the order given)."""
    have = ENGINE_FEATURES.get(kind, CORE)
    return [f for f in needed if f not in have]


def engines_supporting(field: str) -> list[str]:
    """Engine kinds that honour ``field`` (for error messages)."""
    return sorted(k for k, v in ENGINE_FEATURES.items() if field in v)
