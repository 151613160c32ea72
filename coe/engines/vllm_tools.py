"""Tool calls for ``tool_choice: "auto"`` on vLLM: the expert's tool-call parser turns the model's
text into OpenAI ``tool_calls``.

Why: with tools and ``tool_choice`` auto (OpenAI's default when tools are given) a model answers in
its own format (Hermes' ``<tool_call>{…}</tool_call>``, Llama 3's bare JSON, Mistral's
``[TOOL_CALLS]`` …). vLLM's server reads it back with the parser named by ``--tool-call-parser``;
coe does the same per expert, with ``engine_settings.tool_call_parser`` (vLLM's names) and vLLM's
own ``ToolParserManager``. An expert without a parser is refused for such requests at the
ingress (400 ``unsupported_parameter``, ``coe.engines.features.expert_unsupported``), never
answered with the call left as text.

The answer of a request with auto tools is sent whole when it ends (content and tool calls
together, ``finish_reason: "tool_calls"`` when the model called one), as with a forced
tool_choice: the text cannot be streamed before it is known not to be a call. ``tool_choice``
"required" or a named function needs no parser: the output is constrained to the tools' JSON
schema (vLLM's structured outputs) and parsed by coe (``coe.api.protocol.parse_tool_calls``).

vLLM is imported only by :func:`tool_parser`; the rest is plain code, tested on the CPU
(``tests/api/test_vllm_tools.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from coe.engines.base import GenerationChunk, ToolCall, ToolCallFunction

#: what a parse function returns: (content besides the calls, the calls), or None for plain text
Parsed = tuple[str | None, list[ToolCall]] | None


def _vllm_parser_manager() -> Any:
    try:  # vLLM >= 0.12 moved the parsers to the top level
        from vllm.tool_parsers import ToolParserManager
    except ImportError:  # pragma: no cover - older vLLM
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager
    return ToolParserManager


def _vllm_chat_request(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Any:
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:  # pragma: no cover - older vLLM
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest
    return ChatCompletionRequest(model="coe", messages=messages, tools=tools, tool_choice="auto")


def to_tool_calls(info: Any) -> Parsed:
    """vLLM's ``ExtractedToolCallInformation`` (``tools_called``, ``tool_calls`` of OpenAI shape,
    ``content``) as coe's calls; None when the model answered in text."""
    if not getattr(info, "tools_called", False) or not getattr(info, "tool_calls", None):
        return None
    calls = []
    for tc in info.tool_calls:
        fn = tc.function
        calls.append(ToolCall(id=getattr(tc, "id", None) or f"call_{uuid.uuid4().hex[:24]}",
                              function=ToolCallFunction(name=fn.name, arguments=fn.arguments or "{}")))
    content = getattr(info, "content", None)
    return (content if content and content.strip() else None), calls


def tool_parser(name: str, tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]]) -> tuple[Callable[[str], Parsed], bool]:
    """``(parse, keep_special_tokens)`` for one request: ``parse(text)`` runs vLLM's parser
    ``name``; ``keep_special_tokens`` is True when the parser needs the special tokens it looks
    for in the text (vLLM's ``adjust_request`` turns ``skip_special_tokens`` off, e.g. Hermes').
    Raises ``KeyError`` for a name vLLM does not know, ``RuntimeError``/``ValueError`` when the
    parser does not fit the model (e.g. its tokenizer lacks the parser's special tokens)."""
    cls = _vllm_parser_manager().get_tool_parser(name)
    request = _vllm_chat_request(messages, tools)
    try:  # vLLM 0.24: (tokenizer, tools); older releases: (tokenizer)
        parser = cls(tokenizer, request.tools)
    except TypeError:  # pragma: no cover - older vLLM
        parser = cls(tokenizer)
    adjusted = parser.adjust_request(request)
    request = adjusted if adjusted is not None else request

    def parse(text: str) -> Parsed:
        try:
            return to_tool_calls(parser.extract_tool_calls(text, request))
        except Exception:  # noqa: BLE001 - vLLM's server too returns text it cannot parse as content
            return None

    return parse, getattr(request, "skip_special_tokens", True) is False


class ToolCallCollector:
    """Holds each choice's text back until it ends, then sends it whole: as tool calls
    (``finish_reason: "tool_calls"``) when the parser finds any, else as text."""

    def __init__(self, parse: Callable[[str], Parsed]):
        self.parse = parse
        self.text: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[Any]] = {}

    def feed(self, chunk: GenerationChunk) -> GenerationChunk | None:
        """The chunk to pass on (None while the choice runs). Token counts are running totals,
        so the last chunk carries them all."""
        self.text.setdefault(chunk.index, []).append(chunk.text)
        self.logprobs.setdefault(chunk.index, []).extend(chunk.logprobs or [])
        if chunk.finish_reason is None:
            return None
        text = "".join(self.text.pop(chunk.index))
        whole = {"text": text, "logprobs": self.logprobs.pop(chunk.index) or None}
        parsed = self.parse(text) if chunk.finish_reason == "stop" else None
        if parsed is None:
            return chunk.model_copy(update=whole)
        content, calls = parsed
        return chunk.model_copy(update={**whole, "text": content or "", "tool_calls": calls,
                                        "finish_reason": "tool_calls"})
