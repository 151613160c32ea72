"""The one protocol every engine implements, and the value types it speaks.

The tier manager and the pool drive an engine through this protocol only, so a new engine (vLLM with
sleep/wake, say) plugs in without touching them:

===========  ======================================  ==========================================
move         hf engine                               vLLM engine (sleep mode)
===========  ======================================  ==========================================
load()       DISK→DRAM: read weights into one flat   start ``AsyncLLM(enable_sleep_mode=True)``,
             (pinned on CUDA) host buffer            copy the weights once into a pinned host
                                                     buffer, ``sleep(level=2)``
to_hbm()     DRAM→HBM: one host→device copy, params  map the weights again and copy the pinned
             become views of the device buffer       copy into them, then ``wake_up()``
to_dram()    HBM→DRAM: drop the device buffer (no    ``sleep(level=2)``: nothing copied back
             device→host copy: weights immutable)    (weights are immutable while served)
unload()     DRAM→DISK: drop the host buffer         shut the engine down
===========  ======================================  ==========================================

``generate`` is only valid while the engine is in :attr:`Tier.HBM` (the pool holds a lease from the
tier manager around it).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from coe.engines.memory import EngineMemory
    from expert_registry.spec import Expert, GenerationDefaults


class Tier(str, enum.Enum):
    """Where an expert's weights are. Ordered: DISK < DRAM < HBM."""

    DISK = "disk"
    DRAM = "dram"
    HBM = "hbm"

    @property
    def rank(self) -> int:
        return {"disk": 0, "dram": 1, "hbm": 2}[self.value]


#: vLLM's ``_SAMPLING_EPS``: a temperature below it is greedy (temperature 0). Dividing logits by a
#: smaller one overflows float32 to ``inf`` and softmax to NaN, and sampling fails (issue 24, High 1);
#: a ``repetition_penalty`` below it is refused for the same reason (logits divided by it).
SAMPLING_EPS = 1e-5


def greedy_below_eps(temperature: float) -> float:
    """``temperature``, or 0.0 when it is below :data:`SAMPLING_EPS` (greedy, as vLLM treats it)."""
    return 0.0 if temperature < SAMPLING_EPS else temperature


class StructuredOutput(BaseModel):
    """A constraint on the output's shape, after vLLM's ``StructuredOutputsParams`` (one kind set).

    ``response_format`` (``json_object`` / ``json_schema``) and a forced ``tool_choice`` become one of
    these in :meth:`coe.api.protocol.ChatCompletionRequest.to_sampling_params`."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingParams(BaseModel):
    """Per-request sampling, engine side; fields the client did not set fall back to the expert's
    generation defaults (:meth:`with_defaults`).

    The fields after ``ignore_eos`` mirror vLLM's ``SamplingParams`` and stay at their neutral value
    unless the client asked otherwise. Only engines that list a field in
    :data:`coe.engines.features.ENGINE_FEATURES` ever receive it non-neutral: the service routes a
    request only to experts whose engine can honour it (a 400 ``unsupported_parameter`` otherwise).
    ``tools`` and ``chat_template_kwargs`` shape the prompt rather than the sampling; they travel here
    so that the engine protocol stays ``generate(messages, params)``."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=SAMPLING_EPS, le=10.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="top-k logprobs per token; None = off")
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    structured: StructuredOutput | None = None
    tools: list[dict[str, Any]] | None = None
    tools_auto: bool = Field(False, description="tools with tool_choice 'auto': the engine parses its output "
                                                "into tool calls (vLLM's tool-call parser of the expert)")
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("temperature")
    @classmethod
    def _tiny_temperature_is_greedy(cls, v: float) -> float:
        """0 < t < :data:`SAMPLING_EPS` is greedy rather than an error: what vLLM does with it, and
        what a client sending 1e-38 for "deterministic" means; left as is it poisons sampling."""
        return greedy_below_eps(v)

    def with_defaults(self, generation: GenerationDefaults | None) -> "SamplingParams":
        """Fill the fields the caller did not set from an expert's ``generation`` defaults."""
        if generation is None:
            return self
        upd = {f: getattr(generation, f) for f in ("max_tokens", "temperature", "top_p", "stop")
               if f not in self.model_fields_set and getattr(generation, f) is not None}
        return self.model_copy(update=upd) if upd else self


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    """An assistant turn's tool call (OpenAI shape), kept through multi-turn conversations."""

    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One chat turn (OpenAI shape: text content, plus the tool fields of multi-turn tool use)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"] | str
    content: str
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The dict a chat template sees: role and content always, the tool fields when present."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [tc.model_dump() for tc in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class TokenLogprob(BaseModel):
    """One generated token's log-probability and its top alternatives (OpenAI ``logprobs.content``)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class GenerationChunk(BaseModel):
    """One streamed delta. The last chunk of a stream has ``finish_reason`` set; token counts are
    running totals, so the last chunk carries the usage to report."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = Field(default_factory=list)  # ids of this delta (tests, benches)
    index: int = 0  # which of the request's ``n`` choices this delta belongs to
    more: bool = False  # n > 1: this choice finished but others still run (the stream goes on)
    logprobs: list[TokenLogprob] | None = None  # for the tokens of this delta, when asked for
    tool_calls: list[ToolCall] | None = None  # tool_choice "auto": the calls parsed from the whole output


def as_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalise ChatMessage objects / dicts into the plain dicts chat templates take (tool calls,
    tool results and names kept)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        cm = m if isinstance(m, ChatMessage) else ChatMessage.model_validate(dict(m))
        out.append(cm.template_dict())
    return out


@dataclass
class SwapRecord:
    """What one tier move cost (the tier manager turns these into metrics)."""

    src: Tier
    dst: Tier
    nbytes: int
    seconds: float


@dataclass
class EngineStats:
    """Counters an engine keeps about itself (batch sizes prove batching happens)."""

    batch_sizes: list[int] = field(default_factory=list)
    requests: int = 0
    completion_tokens: int = 0
    steps: int = 0  # forward passes run (stops growing once every row is cancelled)
    cancelled: int = 0
    joined: int = 0  # requests that joined an already running batch (iteration-level batching)


class Engine(ABC):
    """An expert's model behind the tier protocol and a streaming generate."""

    name: str
    expert: Expert
    #: the step an engine start (:meth:`load`) is at, for ``/v1/models`` and ``coe-registry list``
    #: ("reading weights", "copying weights to host", ...); "" when no start is running
    load_phase: str = ""

    @property
    @abstractmethod
    def tier(self) -> Tier:
        """The tier the weights are in now."""

    @abstractmethod
    def footprint_bytes(self) -> int:
        """Bytes the weights take in DRAM and in HBM (an estimate before :meth:`load`, exact after)."""

    def memory(self) -> "EngineMemory":
        """What this engine holds per state (see :mod:`coe.engines.memory`); the tier manager
        charges it against the budgets. Default: the weights, on the device only while awake."""
        from coe.engines.memory import EngineMemory

        return EngineMemory.weights_only(self.footprint_bytes(), measured=self.tier is not Tier.DISK)

    def debug_state(self) -> dict[str, Any]:
        """What the pool's watchdog logs of this engine (``ExpertPool.diagnose``)."""
        return {"tier": self.tier.value, "load_phase": self.load_phase}

    def measurement_disturbed(self) -> None:
        """The tier manager's word that another engine moved on the device while :meth:`load`
        measured this one: a measurement taken from the device's total is then someone else's too,
        and must not replace the estimate. Default: nothing is measured that way."""

    @abstractmethod
    async def load(self) -> SwapRecord:
        """DISK→DRAM. Raises :class:`coe.errors.ExpertLoadError` when files are missing or corrupt."""

    @abstractmethod
    async def to_hbm(self) -> SwapRecord:
        """DRAM→HBM: make the model usable for :meth:`generate`."""

    @abstractmethod
    async def to_dram(self) -> SwapRecord:
        """HBM→DRAM: release the active copy; the host copy stays."""

    @abstractmethod
    async def unload(self) -> SwapRecord:
        """DRAM→DISK: release the host copy."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The expert's Hugging Face tokenizer (loaded on first use, in any tier)."""

    def apply_chat_template(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
        """The prompt text the model sees (expert's system prompt and template override applied)."""
        return render_chat(self.expert, self.tokenizer, messages)

    def _encode(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[int]:
        tok = self.tokenizer  # loading errors (missing files) stay expert errors, not request errors
        return encode_prompt(self.expert, tok, messages)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> int:
        """Prompt length in tokens (usable in any tier: needs only the tokenizer)."""
        return len(self._encode(messages))

    @abstractmethod
    def generate(
        self, messages: Sequence[ChatMessage | Mapping[str, Any]], params: SamplingParams
    ) -> AsyncIterator[GenerationChunk]:
        """Stream text deltas. Closing the iterator (or cancelling its task) stops the compute."""

    def stats(self) -> EngineStats:
        return EngineStats()

    async def close(self) -> None:
        """Free everything (any tier)."""
        if self.tier is Tier.HBM:
            await self.to_dram()
        if self.tier is Tier.DRAM:
            await self.unload()


async def relay(out: "asyncio.Queue[GenerationChunk | BaseException]") -> AsyncIterator[GenerationChunk]:
    """Yield the chunks a producer puts on ``out`` until one carries a ``finish_reason`` (and is not
    marked ``more``: with ``n`` > 1 only the last choice to finish ends the stream).

    An exception put on the queue is raised here, in the consumer. Shared by the engines (worker
    thread → caller) and the pool (engine task → caller), which add their own cancellation."""
    while True:
        item = await out.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None and not item.more:
            return


# Used when neither the expert nor its tokenizer has a chat template (e.g. a bare base model).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


PERSONA_SEPARATOR = "\n\n"


def compose_system(persona: str | None, msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge the expert's persona with the client's leading system message(s) into ONE system message.

    Order (documented in docs/api.md): the expert's ``system_prompt`` first, then the client's leading
    system messages in their order, joined by a blank line. Neither replaces the other (templates
    often keep only one system message); system messages later in the conversation stay in place."""
    lead: list[str] = []
    i = 0
    while i < len(msgs) and msgs[i]["role"] == "system":
        lead.append(str(msgs[i]["content"] or ""))
        i += 1
    parts = ([persona] if persona else []) + [p for p in lead if p]
    if not parts:
        return msgs[i:]
    return [{"role": "system", "content": PERSONA_SEPARATOR.join(parts)}] + msgs[i:]


def encode_prompt(expert: Expert, tokenizer: Any, messages: Sequence[ChatMessage | Mapping[str, Any]],
                  tools: list[dict[str, Any]] | None = None,
                  template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """The prompt's token ids: :func:`render_chat`, then the tokenizer.

    Everything that can fail here because of what the *request* holds (a template that raises on
    its roles, text the tokenizer cannot encode) raises :class:`coe.errors.RequestError`, so the
    pool answers that request with a 400 and leaves the expert's health alone (decision 2). A
    template that does not even parse is the expert's fault and stays an ordinary exception. The
    caller loads the tokenizer first, so a missing tokenizer file is never mistaken for bad input."""
    from jinja2 import TemplateSyntaxError

    from coe.errors import RequestError

    try:
        text = render_chat(expert, tokenizer, messages, tools, template_kwargs)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TemplateSyntaxError:
        raise
    except (RequestError, MemoryError):
        raise
    except Exception as exc:
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise RequestError(f"the messages could not be turned into a prompt for expert "
                           f"'{expert.name}': {type(exc).__name__}"
                           + (f": {detail}" if detail else "")) from exc


def render_chat(expert: Expert, tokenizer: Any, messages: Sequence[ChatMessage | Mapping[str, Any]],
                tools: list[dict[str, Any]] | None = None,
                template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text every engine feeds its model: the expert's system prompt composed with the
    client's (:func:`compose_system`), then the expert's template override, the tokenizer's, or the
    fallback. ``tools`` reach the template the way HF chat templates take them (``tools=``)."""
    msgs = compose_system(expert.system_prompt, as_messages(messages))
    template = expert.chat_template or tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    extra = dict(template_kwargs or {})
    if tools:
        extra["tools"] = tools
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template,
                                         **extra)
