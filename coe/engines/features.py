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
from typing import Any

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

#: the feature of a request with tools and tool_choice "auto" (or unset): the model may call a tool
#: in its own text format, which the expert's tool-call parser must read (reported as 'tool_choice')
AUTO_TOOL_CHOICE = "tool_choice=auto"

ENGINE_FEATURES: dict[str, frozenset[str]] = {
    "hf": CORE,
    "vllm": CORE | VLLM_FEATURES | {AUTO_TOOL_CHOICE},
}


def field_name(feature: str) -> str:
    """The request field a feature is about (``tool_choice=auto`` -> ``tool_choice``)."""
    return feature.split("=", 1)[0]


def engine_kind(expert: Any, device: str) -> str:
    """The engine an expert runs on in a pool on ``device`` (``auto`` resolved the way
    :func:`coe.engines.create_engine` does: vLLM on CUDA where it is installed, else hf)."""
    kind = getattr(expert, "engine", "auto") or "auto"
    if kind != "auto":
        return kind
    if str(device).startswith("cuda") and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    return "hf"


def unsupported(kind: str, needed: Iterable[str]) -> list[str]:
    """The fields of ``needed`` that engine ``kind`` cannot honour (in the order given)."""
    have = ENGINE_FEATURES.get(kind, CORE)
    return [f for f in needed if f not in have]


def tool_call_parser(expert: Any, defaults: Any = None) -> str | None:
    """The vLLM tool-call parser an expert runs with: its own ``engine_settings``, else the pool's
    ``engine_defaults``."""
    own = getattr(getattr(expert, "engine_settings", None), "tool_call_parser", None)
    return own or getattr(defaults, "tool_call_parser", None)


def expert_unsupported(expert: Any, device: str, needed: Iterable[str], defaults: Any = None) -> tuple[str, str] | None:
    """``(field, why)`` for the first field of ``needed`` this expert cannot honour, else None.
    Beyond its engine's field list: tool_choice "auto" with tools (:data:`AUTO_TOOL_CHOICE`, see
    ``ChatCompletionRequest.features``) needs the expert's vLLM tool-call parser
    (``engine_settings.tool_call_parser``) to read calls out of its text."""
    needed = list(needed)
    kind = engine_kind(expert, device)
    miss = unsupported(kind, needed)
    if miss:
        return field_name(miss[0]), (f"engine '{kind}'; engines that support it: "
                                     f"{', '.join(engines_supporting(miss[0])) or 'none'}")
    if AUTO_TOOL_CHOICE in needed and not tool_call_parser(expert, defaults):
        return "tool_choice", ("tool_choice 'auto' with tools needs the expert's engine_settings.tool_call_parser "
                               "(vLLM's parser name, e.g. hermes or llama3_json), which is not set; send "
                               "tool_choice 'required' or a named function instead")
    return None


def engines_supporting(field: str) -> list[str]:
    """Engine kinds that honour ``field`` (for error messages)."""
    return sorted(k for k, v in ENGINE_FEATURES.items() if field in v)
