"""OpenAI-compatible HTTP schemas (pydantic), after vLLM's ``entrypoints/openai/protocol.py``.

Every field of vLLM 0.24's ``ChatCompletionRequest`` (plus the OpenAI fields vLLM ignores) is
declared here, so that nothing a client sends is silently dropped:

* a field at its *neutral* value (:data:`NEUTRAL`: what the SDKs send by default) is accepted by
  every engine;
* a non-neutral value of a field some engine honours is a *feature* of the request
  (:meth:`ChatCompletionRequest.features`): a hard routing constraint, checked against
  :data:`coe.engines.features.ENGINE_FEATURES`;
* a non-neutral value of a field no coe engine honours (:data:`REFUSED`), or a field coe does not
  know at all, is a 400 ``unsupported_parameter`` naming it.

:meth:`ChatCompletionRequest.to_generate_request` is the one place where a request becomes the
typed :class:`coe.generate_request.GenerateRequest` (messages + engine ``SamplingParams``) that
crosses from the ingress to the pool replica. docs/api.md has the field table.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coe.engines.base import SAMPLING_EPS, ChatMessage, SamplingParams, StructuredOutput, ToolCall
from coe.generate_request import GenerateRequest

INT64 = 2**63
INT32_MAX = 2**31 - 1


def new_id(prefix: str) -> str:
    """An OpenAI-style object id (``chatcmpl-…``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class RequestFieldError(ValueError):
    """A request field coe cannot honour or a bad combination (the ingress makes it a 400)."""

    def __init__(self, message: str, param: str, code: str = "unsupported_parameter"):
        super().__init__(message)
        self.param = param
        self.code = code


# ---- messages ---------------------------------------------------------------------------------
class ContentPart(BaseModel):
    """One part of a multi-part message; text parts are joined, other kinds are refused (no coe
    engine takes images, audio or files)."""

    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str | None = None


class ChatMessageIn(BaseModel):
    """A message as a client sends it (``content`` may be a string or a list of parts); the tool
    fields of multi-turn tool use are kept."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        """The message's text, text parts joined; non-text parts are rejected earlier."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)

    def to_engine(self) -> ChatMessage:
        """The engine's message: ``developer`` is a system message (as vLLM maps it)."""
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=self.text(), name=self.name, tool_calls=self.tool_calls or None,
                           tool_call_id=self.tool_call_id)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


# ---- field classes ------------------------------------------------------------------------------
def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


#: a field's neutral value(s): at one of them, every engine accepts the field (it changes nothing)
NEUTRAL: dict[str, Any] = {
    "n": lambda v: v in (None, 1),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "repetition_penalty": lambda v: v in (None, 1, 1.0),
    "top_k": lambda v: v in (None, -1, 0),
    "min_p": lambda v: v in (None, 0, 0.0),
    "min_tokens": lambda v: v in (None, 0),
    "logit_bias": _empty,
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "stop_token_ids": _empty,
    "include_stop_str_in_output": lambda v: v in (None, False),
    "skip_special_tokens": lambda v: v in (None, True),
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "bad_words": _empty,
    "allowed_token_ids": _empty,
    "truncate_prompt_tokens": lambda v: v is None,
    "response_format": lambda v: v is None or v.type == "text",
    "structured_outputs": _empty,
    "guided_json": _empty,
    "guided_regex": _empty,
    "guided_choice": _empty,
    "guided_grammar": _empty,
    "guided_decoding_backend": _empty,
    "guided_whitespace_pattern": _empty,
    "tools": _empty,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: v in (None, True),
    "chat_template_kwargs": _empty,
    "reasoning_effort": lambda v: v is None,
    "include_reasoning": lambda v: v in (None, True),
    "ignore_eos": lambda v: v in (None, False),
    # refused (no coe engine honours them)
    "use_beam_search": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "prompt_logprobs": lambda v: v is None,
    "echo": lambda v: v in (None, False),
    "add_generation_prompt": lambda v: v in (None, True),
    "continue_final_message": lambda v: v in (None, False),
    "add_special_tokens": lambda v: v in (None, False),
    "documents": _empty,
    "chat_template": _empty,
    "mm_processor_kwargs": _empty,
    "priority": lambda v: v in (None, 0),
    "logits_processors": _empty,
    "return_tokens_as_token_ids": lambda v: v in (None, False),
    "return_token_ids": lambda v: v in (None, False),
    "cache_salt": _empty,
    "kv_transfer_params": _empty,
    "vllm_xargs": _empty,
    "functions": _empty,
    "function_call": _empty,
    "audio": _empty,
    "modalities": lambda v: v in (None, [], ["text"]),
    "prediction": _empty,
    "web_search_options": _empty,
    "store": lambda v: v in (None, False),
    "service_tier": lambda v: v in (None, "auto", "default"),
    "verbosity": lambda v: v in (None, "medium"),
}

#: non-neutral values of these fields are refused by every engine (with the reason shown)
REFUSED: dict[str, str] = {
    "use_beam_search": "beam search is not supported",
    "best_of": "best_of is not supported (vLLM's V1 engine dropped it too)",
    "length_penalty": "length_penalty only applies to beam search, which is not supported",
    "prompt_logprobs": "prompt logprobs are not returned",
    "echo": "echoing the prompt is not supported",
    "add_generation_prompt": "the generation prompt is always added",
    "continue_final_message": "continuing the final message is not supported",
    "add_special_tokens": "special tokens come from the chat template",
    "documents": "RAG documents in the chat template are not supported",
    "chat_template": "a chat template from the request is refused (templates are code); set the expert's "
                     "chat_template in the registry",
    "mm_processor_kwargs": "no coe engine takes multimodal input",
    "priority": "request priorities are not supported",
    "logits_processors": "logits processors from a request are refused",
    "return_tokens_as_token_ids": "token-id output is not supported",
    "return_token_ids": "token-id output is not supported",
    "cache_salt": "prefix-cache salts are not supported",
    "kv_transfer_params": "KV transfer is not supported",
    "vllm_xargs": "vLLM extension arguments are refused",
    "truncate_prompt_tokens": "prompt truncation is not supported (vLLM 0.24's SamplingParams has no such field)",
    "functions": "the deprecated 'functions' field is not supported; send 'tools'",
    "function_call": "the deprecated 'function_call' field is not supported; send 'tool_choice'",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "store": "coe does not store completions",
    "service_tier": "service tiers are not supported",
    "verbosity": "verbosity is not supported",
    "guided_decoding_backend": "the structured-output backend is chosen by the engine",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported",
    "include_reasoning": "reasoning output cannot be turned off",
}

#: accepted with any value; they do not change the output (metadata about the caller)
METADATA = ("user", "metadata", "safety_identifier", "prompt_cache_key", "request_id")


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body: vLLM 0.24's field list (docs/api.md has the table)."""

    model_config = ConfigDict(extra="allow")
    # --- OpenAI
    model: str = Field("coe", min_length=1, max_length=256)
    messages: list[ChatMessageIn] = Field(max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    # 0 <= t < SAMPLING_EPS is greedy (SamplingParams); NaN and inf (JSON's NaN, 1e999) fail the bounds
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    # a signed 64-bit integer, as vLLM takes; beyond it torch's generator raised deep in the pool
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    n: int | None = Field(default=1, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    verbosity: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # --- vLLM sampling extras
    best_of: int | None = None
    use_beam_search: bool = False
    # bounded so that no value overflows the engine's int32 / float32 sampling tensors (issue 24)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, ge=SAMPLING_EPS, le=10.0)
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, le=INT32_MAX)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # --- vLLM extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    include_reasoning: bool = True
    priority: int = 0
    request_id: str | None = Field(default=None, max_length=128)
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None

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

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values are in [-100, 100], got {b}")
        return v

    # ---- what the request needs ---------------------------------------------------------------
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) wins over ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def non_neutral(self) -> list[str]:
        """Fields set to a value that changes the output beyond the core fields, in field order."""
        return [f for f, neutral in NEUTRAL.items() if not neutral(getattr(self, f, None))]

    def check_supported(self) -> None:
        """Raise :class:`RequestFieldError` for a field no coe engine honours, an unknown field, or
        a bad combination (OpenAI's own rules)."""
        for extra in self.model_extra or {}:
            raise RequestFieldError(f"unknown parameter '{extra}': coe accepts the fields of vLLM's OpenAI "
                                    f"chat API (see docs/api.md)", extra)
        for f in self.non_neutral():
            if f in REFUSED:
                raise RequestFieldError(f"'{f}' is not supported: {REFUSED[f]}", f)
        if self.top_logprobs and not self.logprobs:
            raise RequestFieldError("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise RequestFieldError("'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise RequestFieldError(f"tool_choice names '{self.tool_choice.function.name}', which is not "
                                        f"in 'tools'", "tool_choice", "invalid_value")
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and (rf.json_schema is None or rf.json_schema.json_schema is None):
            raise RequestFieldError("response_format json_schema needs 'json_schema.schema'", "response_format",
                                    "invalid_value")
        if rf is not None and rf.type == "structural_tag":
            raise RequestFieldError("response_format 'structural_tag' is not supported", "response_format")
        if self.stream and (self.n or 1) > 1 and self.forced_tool_choice():
            raise RequestFieldError("streaming n>1 with a forced tool_choice is not supported", "n")

    def features(self) -> list[str]:
        """The non-neutral fields an engine must honour to serve this request (routing constraint).
        ``tool_choice=auto`` is one when tools come with tool_choice "auto" (OpenAI's default then):
        the expert must parse tool calls out of free text, which needs its vLLM tool-call parser."""
        from coe.engines.features import AUTO_TOOL_CHOICE

        out = [f for f in self.non_neutral() if f not in REFUSED]
        if self.auto_tools():
            out.append(AUTO_TOOL_CHOICE)
        return out

    def auto_tools(self) -> bool:
        """Tools given and the model may call them or answer in text (``tool_choice`` auto or unset)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def forced_tool_choice(self) -> str | None:
        """``"required"``, the forced function's name, or None when the model may answer in text."""
        if not self.tools:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "required" if self.tool_choice == "required" else None

    # ---- the one conversion ---------------------------------------------------------------------
    def _structured(self) -> StructuredOutput | None:
        forced = self.forced_tool_choice()
        if forced == "required":
            return StructuredOutput(json_schema=tool_calls_schema(self.tools or []))
        if forced:
            fn = next(t.function for t in self.tools or [] if t.function.name == forced)
            return StructuredOutput(json_schema=fn.parameters or {"type": "object"})
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return StructuredOutput(json_object=True)
        if rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            return StructuredOutput(json_schema=rf.json_schema.json_schema)
        so = self.structured_outputs or {}
        if so:
            keys = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
                    "grammar": "grammar"}
            unknown = sorted(set(so) - set(keys))
            if unknown:
                raise RequestFieldError(f"structured_outputs.{unknown[0]} is not supported", "structured_outputs")
            upd = {keys[k]: (json.loads(v) if k == "json" and isinstance(v, str) else v) for k, v in so.items()}
            return StructuredOutput(**upd)
        if self.guided_json:
            gj = self.guided_json
            return StructuredOutput(json_schema=json.loads(gj) if isinstance(gj, str) else gj)
        if self.guided_regex:
            return StructuredOutput(regex=self.guided_regex)
        if self.guided_choice:
            return StructuredOutput(choice=self.guided_choice)
        if self.guided_grammar:
            return StructuredOutput(grammar=self.guided_grammar)
        return None

    def to_sampling_params(self) -> SamplingParams:
        """The engine's sampling parameters (after vLLM's ``to_sampling_params``). Only what the
        client set is set, so the expert's generation defaults still fill the rest."""
        p: dict[str, Any] = {}
        if self.requested_max_tokens() is not None:
            p["max_tokens"] = self.requested_max_tokens()
        for f in ("temperature", "top_p", "seed"):
            if getattr(self, f) is not None:
                p[f] = getattr(self, f)
        if self.stop is not None:
            p["stop"] = list(self.stop)
        nn = set(self.non_neutral())
        for f in ("n", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p",
                  "min_tokens", "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
                  "spaces_between_special_tokens", "bad_words", "allowed_token_ids", "truncate_prompt_tokens",
                  "ignore_eos"):
            if f in nn:
                p[f] = getattr(self, f)
        if "logit_bias" in nn:
            p["logit_bias"] = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.logprobs:
            p["logprobs"] = self.top_logprobs or 0
        structured = self._structured()
        if structured is not None:
            p["structured"] = structured
        if self.tools and self.tool_choice != "none":
            p["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.auto_tools():
            p["tools_auto"] = True
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
        if kwargs:
            p["chat_template_kwargs"] = kwargs
        return SamplingParams(**p)

    def to_generate_request(self, request_id: str | None = None) -> GenerateRequest:
        """The typed object the pool replica receives (messages + sampling)."""
        return GenerateRequest(messages=[m.to_engine() for m in self.messages], sampling=self.to_sampling_params(),
                               max_tokens_explicit=self.requested_max_tokens() is not None,
                               request_id=request_id)


def tool_calls_schema(tools: list[ToolDef]) -> dict[str, Any]:
    """JSON schema of a list of calls to ``tools`` (``tool_choice: "required"``), the shape vLLM uses:
    ``[{"name": ..., "parameters": {...}}, ...]`` with at least one item."""
    variants = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                "parameters": t.function.parameters or {"type": "object"}},
                 "required": ["name", "parameters"]} for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": variants}}


def parse_tool_calls(text: str, forced: str) -> list[ToolCall] | None:
    """The tool calls in a forced-tool-choice answer (``forced`` = "required" or a function name);
    None when the text is not the JSON the constraint asked for (then it is returned as content)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    calls: list[tuple[str, Any]] = []
    if forced == "required":
        if not isinstance(doc, list):
            return None
        for item in doc:
            if not isinstance(item, dict) or "name" not in item:
                return None
            calls.append((str(item["name"]), item.get("parameters", {})))
    else:
        calls.append((forced, doc))
    return [ToolCall(id=new_id("call"), function={"name": n, "arguments": json.dumps(a)}) for n, a in calls]


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
    conversation: str | None = None  # "sticky" | "switched: why" | "new" (multi-turn affinity)
    replica: str | None = None  # the ExpertPool replica that generated the answer (Serve's replica id)
    node: str | None = None  # the Ray node id of that replica


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None = "stop"
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    coe: CoeInfo


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
    phase: str | None = None  # expert loading: what its engine start is doing ("reading weights", ...)
    loading_s: float | None = None  # expert loading after its add: seconds so far
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
