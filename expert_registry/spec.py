"""The ``Expert`` spec: what the registry stores about one expert LLM.

A pydantic model with ``extra="forbid"`` so a typo in a spec file (``temprature: 0.2``) is an
error, not a silently ignored field. The same model is stored in Redis (as JSON), exported to
YAML, and handed to the router and the expert pool.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from expert_registry.errors import InvalidCategoryMap, InvalidExpert

NAME_PATTERN = r"^[a-z0-9._-]{1,64}$"
_NAME_RE = re.compile(NAME_PATTERN)
# "coe" is the model name that asks the router to choose ("coe" / "coe/<category>"); "." and ".."
# would be confusing as names in paths and URLs.
RESERVED_NAMES = frozenset({"coe", ".", ".."})

Slug = Annotated[str, Field(pattern=NAME_PATTERN)]
Score = Annotated[float, Field(ge=0.0, le=1.0)]

#: category -> ordered list of expert names (stage 2 of routing reads it). Order = preference.
CategoryMap = dict[str, list[str]]


def utcnow() -> datetime:
    """Timezone-aware now; timestamps are stored in UTC."""
    return datetime.now(timezone.utc)


class GenerationDefaults(BaseModel):
    """Sampling defaults of an expert, used when a request does not set them."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)


#: Version of the stored entry's shape. A reader refuses (by name) an entry written by a newer coe
#: instead of failing on its unknown fields or dropping it; entries without one are version 1.
SCHEMA_VERSION = 3  # 3: engine_settings.tool_call_parser

QUANTIZATIONS = ("awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors")


class EngineSettings(BaseModel):
    """How the pool starts this expert's engine; ``None`` = the pool's default (``pool.engine_defaults``
    of the service config).

    Closed on purpose: nothing here reaches remote code, worker extensions or other
    security-relevant engine arguments, and a misspelled key is an error, not a silent no-op.
    ``dtype`` and the context length are the expert's own ``dtype`` and ``max_context`` fields."""

    model_config = ConfigDict(extra="forbid")

    kv_cache_bytes: int | None = Field(None, ge=1 << 20, description="KV cache per engine (vLLM kv_cache_memory_bytes)")
    gpu_memory_utilization: float | None = Field(
        None, gt=0.0, le=1.0, description="used only when kv_cache_bytes is unset: vLLM sizes the KV cache from it")
    enforce_eager: bool | None = Field(None, description="no CUDA graphs: faster start, less HBM, slower decode")
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors"] | None = None
    max_num_seqs: int | None = Field(None, ge=1, le=4096, description="requests the engine batches at once")
    load_format: Literal["auto", "safetensors", "dummy"] | None = Field(
        None, description="'dummy': random weights of the real shapes (tests, GPU dry runs)")
    tool_call_parser: str | None = Field(
        None, pattern=r"^[a-z0-9][a-z0-9_.\-]{0,63}$",
        description="vLLM's tool-call parser for tool_choice 'auto' (its --tool-call-parser names: hermes, "
                    "llama3_json, mistral, pythonic …); without one, 'auto' with tools is refused for this expert")

    def merged_over(self, defaults: "EngineSettings") -> "EngineSettings":
        """These settings with every unset field taken from ``defaults``."""
        base = defaults.model_dump()
        base.update(self.model_dump(exclude_none=True))
        return EngineSettings.model_validate(base)


class Expert(BaseModel):
    """One registered expert: where its weights are, how to serve it, what it is good at."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    schema_version: int = Field(SCHEMA_VERSION, ge=1, description="shape of the stored entry; set by the registry")
    name: str = Field(pattern=NAME_PATTERN, description="slug: 1-64 chars of a-z 0-9 . _ -")
    model: str = Field(min_length=1, description="local folder, .gguf file, or hub id")
    gguf_file: str | None = Field(None, description="GGUF file inside `model` (folder or hub repo)")
    revision: str | None = None
    engine: Literal["auto", "hf", "vllm"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_context: int = Field(2048, ge=1)
    engine_settings: EngineSettings = Field(default_factory=EngineSettings)
    chat_template: str | None = None
    system_prompt: str | None = None
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    capabilities: dict[Slug, Score] = Field(default_factory=dict)
    cost_per_1k_tokens: float = Field(0.0, ge=0.0)
    params_b: float | None = Field(None, ge=0.0, description="parameters, in billions")
    size_bytes: int | None = Field(None, ge=0, description="weights on disk, recorded by `add`")
    trust_remote_code: bool = False
    tags: list[str] = Field(default_factory=list)
    status: Literal["ready", "failed"] = "ready"
    status_reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(f"written by a newer coe (schema {v}; this one reads up to {SCHEMA_VERSION}): upgrade coe")
        return v

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v in RESERVED_NAMES:
            raise ValueError(f"'{v}' is reserved")
        return v

    @field_validator("created_at", "updated_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=timezone.utc) if v.tzinfo is None else v.astimezone(timezone.utc)


def explain_validation_error(err: ValidationError, source: str = "expert") -> str:
    """One line from a pydantic error: ``expert: capabilities.coding: must be <= 1 (got 1.5)``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "(root)"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
            continue
        msg = e.get("msg", "invalid")
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{shown}")
    return f"{source}: " + "; ".join(parts)


def parse_expert(data: Any, source: str = "expert") -> Expert:
    """Validate a dict (from YAML, JSON or CLI options) into an :class:`Expert`, or raise
    :class:`InvalidExpert` with a one-line message."""
    if isinstance(data, Expert):
        return data
    if not isinstance(data, dict):
        raise InvalidExpert(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return Expert.model_validate(data)
    except ValidationError as err:
        raise InvalidExpert(explain_validation_error(err, source)) from None


_MAP_ADAPTER = TypeAdapter(dict[Slug, list[Slug]])


def parse_category_map(data: Any, source: str = "category map") -> CategoryMap:
    """Validate the shape of a category map (names are slugs, no expert twice in a category).
    Whether the experts exist is checked by the store, inside the write transaction."""
    if data is None:
        return {}
    try:
        m = _MAP_ADAPTER.validate_python(data)
    except ValidationError as err:
        raise InvalidCategoryMap(explain_validation_error(err, source)) from None
    for cat, names in m.items():
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise InvalidCategoryMap(f"{source}: category '{cat}' lists {', '.join(dup)} more than once")
    return m


def validate_name(name: str) -> str:
    """Check an expert name alone (the CLI does this before touching Redis)."""
    if not _NAME_RE.match(name or "") or name in RESERVED_NAMES:
        raise InvalidExpert(
            f"invalid expert name {name!r}: use 1-64 characters of a-z 0-9 . _ - "
            f"(not {', '.join(sorted(RESERVED_NAMES))})"
        )
    return name
