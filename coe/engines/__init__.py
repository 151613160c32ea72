"""Engines: one protocol (:mod:`coe.engines.base`), two implementations (``hf`` on CPU/GPU, ``vllm`` on GPU).

:func:`create_engine` picks the implementation by ``Expert.engine``; modules are imported lazily so
that importing coe never pulls in vLLM.
"""

from __future__ import annotations

import importlib
from typing import Any

from coe.engines.base import Engine

ENGINES: dict[str, str] = {
    "hf": "coe.engines.hf:HFEngine",
    "vllm": "coe.engines.vllm_engine:VLLMEngine",
}


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
    mod, _, cls = ENGINES[kind].partition(":")
    return getattr(importlib.import_module(mod), cls)(expert, device=device, **kwargs)
