"""Engines: one protocol (:mod:`coe.engines.base`), two implementations (``hf`` on CPU/GPU, ``vllm`` on GPU).

:func:`create_engine` picks the implementation by ``Expert.engine``; modules are imported lazily so
that importing coe never pulls in vLLM.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any, Protocol

from coe.engines.base import Engine

if TYPE_CHECKING:
    from expert_registry.spec import EngineSettings, Expert

ENGINES: dict[str, str] = {
    "hf": "coe.engines.hf:HFEngine",
    "vllm": "coe.engines.vllm_engine:VLLMEngine",
}


_TRANSFORMERS_LOCK = threading.Lock()


class EngineFactory(Protocol):
    """What builds (not loads) an expert's engine for a pool: :func:`create_engine`, or a caller's
    own (the serving bench hands the pool engines it already started)."""

    def __call__(self, expert: Expert, *, device: str, max_batch_size: int, defaults: "EngineSettings | None",
                 overhead_bytes: int | None, asleep_bytes: int | None) -> Engine: ...


def import_transformers_once() -> None:
    """Resolve the transformers classes engines use, once, under a lock.

    transformers is a lazy module whose first attribute access imports the submodule; two threads
    doing that at once can fail with ``cannot import name 'AutoTokenizer'``. Seen on CPU and on the
    H200 (2026-11-29) when two experts started loading together in one pool replica: the loser was
    marked failed. Engines load in worker threads, so this runs first, in the caller's thread."""
    with _TRANSFORMERS_LOCK:
        import transformers

        for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "PreTrainedTokenizerFast"):
            getattr(transformers, name)


def create_engine(expert: Expert, device: str = "cpu", max_batch_size: int = 8,
                  defaults: "EngineSettings | None" = None, overhead_bytes: int | None = None,
                  asleep_bytes: int | None = None) -> Engine:
    """Build (not load) the engine for ``expert``. ``auto``: vLLM on a CUDA device where vLLM is
    installed, else ``hf`` (the check does not import vLLM). vLLM gets the expert's
    ``engine_settings`` merged over the pool's ``defaults`` and the pool's memory estimates."""
    kind = expert.engine
    if kind == "auto":
        kind = "hf"
        if str(device).startswith("cuda"):
            from coe.engines.vllm_engine import auto_engine_kind

            kind = auto_engine_kind()
    if kind not in ENGINES:
        raise ValueError(f"expert {expert.name!r}: unknown engine {kind!r}; known: {', '.join(ENGINES)}")
    import_transformers_once()
    mod, _, cls = ENGINES[kind].partition(":")
    factory = getattr(importlib.import_module(mod), cls)
    if kind != "vllm":
        return factory(expert, device=device, max_batch_size=max_batch_size)
    own = expert.engine_settings
    settings = own.merged_over(defaults) if defaults is not None else own
    extra = {k: v for k, v in (("overhead_bytes", overhead_bytes), ("asleep_bytes", asleep_bytes)) if v is not None}
    return factory(expert, device=device, max_batch_size=max_batch_size, settings=settings, **extra)
