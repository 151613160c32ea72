"""Warm the likely expert while routing finishes (issue 14, item 7).

As soon as stage 1 has a confident category (top probability ≥ ``router.warm_hint_min_prob``, or
a category the client forced with ``model="coe/<category>"``), the router replica tells the pool
replica that will serve the expert most likely to be chosen — a fire-and-forget Ray call routed
by the expert's multiplexed id — so a weight switch can start while stage 2, the hop back through
the ingress and the pool's queue still run. The pool treats it as a prefetch: within the budgets,
never waiting, never evicting an expert with queued or running work (``ExpertPool.prefetch_hint``).
A wrong guess costs at most one copy into memory that was free. ``router.warm_hint: false``
switches it off, so the TTFT it saves can be measured against the same service without it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping, Sequence

log = logging.getLogger("coe.serve.router")


def hint_category(model: str, probs: Mapping[str, float], min_prob: float) -> str | None:
    """The category stage 1 is confident of for this request, or None (named experts: no hint)."""
    if model.startswith("coe/"):
        return model[4:]
    if model != "coe" or not probs:
        return None
    top = max(probs, key=probs.__getitem__)
    return top if probs[top] >= min_prob else None


def likely_expert(category: str, experts: Mapping[str, Any], category_map: Mapping[str, Sequence[str]],
                  allowed: set[str] | None = None, map_capability: float = 0.5,
                  residency: Mapping[str, float] | None = None, residency_weight: float = 0.1) -> str | None:
    """The expert stage 2 most likely picks for ``category``: among the ready experts the map lists
    (and the caller may use), the best declared capability for it plus the residency bonus the
    policy gives; map order breaks ties. Quality and cost are left out: this is a guess made before
    stage 2, and a wrong one only warms an expert into free memory."""
    best: tuple[float, int] | None = None
    name = None
    for i, n in enumerate(category_map.get(category, ())):
        e = experts.get(n)
        if e is None or getattr(e, "status", "ready") != "ready" or (allowed is not None and n not in allowed):
            continue
        caps = getattr(e, "capabilities", {}) or {}
        score = float(caps.get(category, map_capability)) + residency_weight * float((residency or {}).get(n, 0.0))
        if best is None or (score, -i) > best:
            best, name = (score, -i), n
    return name


class WarmHinter:
    """Called from the router's batch thread once per routed request after stage 1; sends the hint
    on the replica's event loop (Ray handles are used from there)."""

    def __init__(self, pool: Any, loop: asyncio.AbstractEventLoop, min_prob: float):
        self.pool = pool
        self.loop = loop
        self.min_prob = min_prob
        self.sent = 0

    def __call__(self, request: Mapping[str, Any], probs: Mapping[str, float], snapshot: Any,
                 map_capability: float, residency: Mapping[str, float], residency_weight: float) -> str | None:
        cat = hint_category(str(request.get("model") or "coe"), probs, self.min_prob)
        if cat is None:
            return None
        allowed = set(request["allowed"]) if request.get("allowed") is not None else None
        name = likely_expert(cat, snapshot.experts, snapshot.category_map, allowed, map_capability, residency,
                             residency_weight)
        if name is not None:
            self.loop.call_soon_threadsafe(self._send, name, request.get("request_id"))
        return name

    def _send(self, name: str, request_id: str | None) -> None:
        try:  # fire and forget: the request itself never waits for the hint
            self.pool.options(multiplexed_model_id=name).prefetch_hint.remote(name, request_id)
            self.sent += 1
        except Exception as e:  # noqa: BLE001 - a hint must never fail a request
            log.debug("warm hint for %s not sent: %s", name, e)
