"""The one protocol every engine implements, and the value types it speaks.

The tier manager and the pool drive an engine through this protocol only, so a new engine (vLLM with
sleep/wake, say) plugs in without touching them:

===========  ======================================  ==========================================
move         hf engine                               vLLM engine (sleep mode)
===========  ======================================  ==========================================
load()       DISK→DRAM: read weights into one flat   build ``LLM(enable_sleep_mode=True)``,
             (pinned on CUDA) host buffer            then ``sleep(level=1)``
to_hbm()     DRAM→HBM: one host→device copy, params  ``wake_up()``
             become views of the device buffer
to_dram()    HBM→DRAM: drop the device buffer (no    ``sleep(level=2)`` + keep own pinned copy,
             device→host copy: weights are immutable) or ``sleep(level=1)``
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

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from coe.engines.memory import EngineMemory


class Tier(str, enum.Enum):
    """Where an expert's weights are. Ordered: DISK < DRAM < HBM."""

    DISK = "disk"
    DRAM = "dram"
    HBM = "hbm"

    @property
    def rank(self) -> int:
        return {"disk": 0, "dram": 1, "hbm": 2}[self.value]


class SamplingParams(BaseModel):
    """Per-request sampling; ``None`` fields fall back to the expert's generation defaults."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def with_defaults(self, generation: Any) -> "SamplingParams":
        """Fill the fields the caller did not set from an expert's ``generation`` defaults."""
        if generation is None:
            return self
        upd = {f: getattr(generation, f) for f in ("max_tokens", "temperature", "top_p", "stop")
               if f not in self.model_fields_set and getattr(generation, f, None) is not None}
        return self.model_copy(update=upd) if upd else self


class ChatMessage(BaseModel):
    """One chat turn (OpenAI shape, text content only)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"] | str
    content: str


FinishReason = Literal["stop", "length", "cancelled"]


class GenerationChunk(BaseModel):
    """One streamed delta. The last chunk of a stream has ``finish_reason`` set; token counts are
    running totals, so the last chunk carries the usage to report."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = Field(default_factory=list)  # ids of this delta (tests, benches)


def as_messages(messages: Sequence[ChatMessage | Mapping[str, Any]]) -> list[dict[str, str]]:
    """Normalise ChatMessage objects / dicts into the plain dicts chat templates take."""
    out: list[dict[str, str]] = []
    for m in messages:
        if isinstance(m, ChatMessage):
            out.append({"role": m.role, "content": m.content})
        else:
            cm = ChatMessage.model_validate(dict(m))
            out.append({"role": cm.role, "content": cm.content})
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

    @abstractmethod
    def apply_chat_template(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
        """The prompt text the model sees (expert's system prompt and template override applied)."""

    @abstractmethod
    def count_prompt_tokens(self, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> int:
        """Prompt length in tokens (usable in any tier: needs only the tokenizer)."""

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
    """Yield the chunks a producer puts on ``out`` until one carries a ``finish_reason``.

    An exception put on the queue is raised here, in the consumer. Shared by the engines (worker
    thread → caller) and the pool (engine task → caller), which add their own cancellation."""
    while True:
        item = await out.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


# Used when neither the expert nor its tokenizer has a chat template (e.g. a bare base model).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def render_chat(expert: Any, tokenizer: Any, messages: Sequence[ChatMessage | Mapping[str, Any]]) -> str:
    """The prompt text every engine feeds its model: the expert's system prompt (unless the
    conversation has one), then the expert's template override, the tokenizer's, or the fallback."""
    msgs = as_messages(messages)
    sys_prompt = getattr(expert, "system_prompt", None)
    if sys_prompt and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": sys_prompt}] + msgs
    template = getattr(expert, "chat_template", None) or tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=template)
