"""Readiness, apart from liveness: ``/healthz`` says the process answers, ``/readyz`` says a request
would be served now, without a cold start.

Kubernetes (and ``coe serve``'s banner) wait for ``/readyz``. It turns 200 once the ingress has
*warmed up*: for every category the router can route, it routed a one-token request there and ran
it on the chosen expert, so that expert's weights are loaded and its engine has run once (the first
generation of an ``hf`` engine pays one-off set-up that a user must not see). After that it stays
200 while every routable category still has a candidate expert in memory (HBM or DRAM), as the
pool reports over Ray (``sync``); per-expert detail stays in ``/v1/models``.

Categories that route nowhere (no expert, every candidate failed) are not "routable" and do not
hold readiness back: a request for them would get a clear 503 whether or not the pod is ready.
The plan is made once at start; experts added later are loaded by their first request.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WarmUp:
    """What the warm-up found and did; the ingress fills it in, :func:`readiness` reads it."""

    #: category -> the experts that could serve it (the chosen one first), for routable categories
    plan: dict[str, list[str]] = field(default_factory=dict)
    #: experts that answered a one-token request
    warmed: set[str] = field(default_factory=set)
    #: expert -> why its warm-up request failed
    failed: dict[str, str] = field(default_factory=dict)
    done: bool = False
    step: str = "waiting for the router and the expert pool"


def readiness(w: WarmUp, residency: dict[str, float] | None) -> tuple[bool, dict]:
    """``(ready, body)`` for ``/readyz``. ``residency`` is the pool's expert -> score (HBM 1,
    DRAM 0.5, disk or failed 0), or None when the pool did not answer."""
    if not w.done:
        return False, {"status": "starting", "detail": w.step, "warmed": sorted(w.warmed)}
    if residency is None:
        return False, {"status": "unavailable", "detail": "the expert pool did not answer"}
    missing = sorted(cat for cat, names in w.plan.items() if not any(residency.get(n, 0.0) > 0 for n in names))
    body = {"status": "ready" if not missing else "not_ready",
            "categories": {cat: next((n for n in names if residency.get(n, 0.0) > 0), None)
                           for cat, names in sorted(w.plan.items())}}
    if missing:
        body["detail"] = f"no expert in memory for: {', '.join(missing)}"
    if w.failed:
        body["failed"] = dict(w.failed)
    return not missing, body
