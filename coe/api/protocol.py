"""OpenAI-compatible HTTP schemas (pydantic), after vLLM's ``entrypoints/openai/protocol.py``.

Only the fields coe acts on are typed strictly; other OpenAI fields that clients send by default
(``frequency_penalty``, ``user``, ``logit_bias`` …) are accepted and ignored so that stock clients
work, which is why the request models allow extra keys.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def new_id(prefix: str) -> str:
    """An OpenAI-style object id (``chatcmpl-…``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str | None = None


class ChatMessageIn(BaseModel):
    """A message as a client sends it (``content`` may be a string or a list of text parts)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = Field(default=None)
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        """The message's text, text parts joined; non-text parts are rejected earlier."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body."""

    model_config = ConfigDict(extra="allow")
    model: str = Field("coe", min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    # a signed 64-bit integer, as vLLM takes; beyond it torch's generator raised deep in the pool
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        items = [v] if isinstance(v, str) else list(v)
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > 256 for s in items):
            raise ValueError("a stop sequence may be at most 256 characters")
        return items

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) wins over ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class RouteRequest(BaseModel):
    """``POST /v1/route``: the routing part of a chat request (other chat fields are ignored)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field("coe", min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CoeInfo(BaseModel):
    """The routing decision as returned in the ``coe`` field of responses (and by ``/v1/route``)."""

    model_config = ConfigDict(extra="allow")
    expert: str
    category: str | None = None
    forced: str = "auto"
    route_ms: float = 0.0
    category_probs: list[dict[str, Any]] = Field(default_factory=list)
    candidates: list[dict[str, Any]] = Field(default_factory=list)
    fallback_reason: str | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None = "stop"
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    coe: CoeInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class StreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: Usage | None = None
    coe: CoeInfo | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``; ``coe`` adds what the entry is and where it lives."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "coe"
    kind: Literal["router", "category", "expert"]
    description: str | None = None
    experts: list[str] | None = None  # router/category: who may answer
    tier: str | None = None  # expert: hbm | dram | disk | unloaded
    status: str | None = None  # expert: ready | failed | removing …
    status_reason: str | None = None
    max_context: int | None = None
    capabilities: dict[str, float] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


def error_payload(message: str, type: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    """The one builder of the OpenAI error body (``{"error": {...}}``); the ingress's exception
    handlers and its ASGI middlewares (auth, body limits) all answer with it."""
    return ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code)).model_dump()
