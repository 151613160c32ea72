"""Engines: one protocol (:mod:`coe.engines.base`), two implementations (``hf`` on CPU/GPU, ``vllm`` on GPU).

:func:`create_engine` picks the implementation by ``Expert.engine``; modules are imported lazily so
that importing coe never pulls in vLLM.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from coe.engines.base import Engine

ENGINES: dict[str, str] = {
    "hf": "coe.engines.hf:HFEngine",
    "vllm": "coe.engines.vllm_engine:VLLMEngine",
}


_TRANSFORMERS_LOCK = threading.Lock()


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


def create_engine(expert: Any, device: str = "cpu", **kwargs: Any) -> Engine:
    """Build (not load) the engine for ``expert``. ``auto``: vLLM on a CUDA device where vLLM is
    installed, else ``hf`` (the check does not import vLLM)."""
    kind = getattr(expert, "engine", "auto") or "auto"
    if kind == "auto":
        kind = "hf"
        if str(device).startswith("cuda"):
            from coe.engines.vllm_engine import auto_engine_kind

            kind = auto_engine_kind()
    if kind not in ENGINES:
        raise ValueError(f"expert {expert.name!r}: unknown engine {kind!r}; known: {', '.join(ENGINES)}")
    import_transformers_once()
    mod, _, cls = ENGINES[kind].partition(":")
    return getattr(importlib.import_module(mod), cls)(expert, device=device, **kwargs)
