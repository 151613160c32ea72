"""Assembling the pool's stream items into OpenAI choices (plain functions; tested without Ray).

The pool streams ``{"type": "chunk", "index", "text", "logprobs", "finish_reason", ...}`` items;
``index`` is the choice (``n`` > 1), ``logprobs`` a list of :class:`coe.engines.base.TokenLogprob`
dicts. A forced ``tool_choice`` constrains the output to JSON, which becomes ``tool_calls`` here
(vLLM's server does the same for ``required`` and named tool choices); with ``tool_choice`` auto the
engine's tool-call parser found the calls, and the last item carries them (``tool_calls``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coe.api.protocol import (
    ChatMessageOut,
    Choice,
    ToolCall,
    ChoiceLogprobs,
    TokenLogprobOut,
    TopLogprob,
    parse_tool_calls,
)


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def logprobs_out(items: list[dict[str, Any]] | None) -> list[TokenLogprobOut]:
    """Engine logprobs (``{"token", "logprob", "top": [[token, logprob], ...]}``) in OpenAI's shape."""
    out = []
    for lp in items or []:
        top = [TopLogprob(token=t, logprob=v, bytes=_bytes(t)) for t, v in lp.get("top") or []]
        out.append(TokenLogprobOut(token=lp["token"], logprob=lp["logprob"], bytes=_bytes(lp["token"]),
                                   top_logprobs=top))
    return out


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobOut] = field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0
    tool_calls: list[ToolCall] | None = None  # parsed by the engine (tool_choice auto)


class ChoicesBuilder:
    """Collects stream items per choice; ``choices()`` gives the final OpenAI choices."""

    def __init__(self, n: int, want_logprobs: bool, forced_tool: str | None):
        self.states = {i: ChoiceState(i) for i in range(n)}
        self.want_logprobs = want_logprobs
        self.forced_tool = forced_tool
        self.prompt_tokens = 0

    def add(self, item: dict[str, Any]) -> ChoiceState:
        st = self.states.setdefault(int(item.get("index") or 0), ChoiceState(int(item.get("index") or 0)))
        if item.get("text"):
            st.text.append(item["text"])
        if self.want_logprobs:
            st.logprobs.extend(logprobs_out(item.get("logprobs")))
        st.completion_tokens = max(st.completion_tokens, int(item.get("completion_tokens") or 0))
        self.prompt_tokens = int(item.get("prompt_tokens") or self.prompt_tokens)
        if item.get("tool_calls"):
            st.tool_calls = [ToolCall.model_validate(tc) for tc in item["tool_calls"]]
        if item.get("finish_reason"):
            st.finish = item["finish_reason"]
        return st

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.states.values())

    def message(self, st: ChoiceState) -> tuple[ChatMessageOut, str]:
        """The assistant message of a finished choice and its finish reason."""
        text = "".join(st.text)
        finish = st.finish or "stop"
        if st.tool_calls:
            return ChatMessageOut(content=text or None, tool_calls=st.tool_calls), "tool_calls"
        if self.forced_tool and finish == "stop":
            calls = parse_tool_calls(text, self.forced_tool)
            if calls is not None:
                return ChatMessageOut(content=None, tool_calls=calls), "tool_calls"
        return ChatMessageOut(content=text), finish

    def choices(self) -> list[Choice]:
        out = []
        for i in sorted(self.states):
            st = self.states[i]
            msg, finish = self.message(st)
            lp = ChoiceLogprobs(content=st.logprobs) if self.want_logprobs else None
            out.append(Choice(index=i, message=msg, finish_reason=finish, logprobs=lp))
        return out
