"""What the running coe service says about each expert now (``coe-registry list``).

Decision 3 of DESIGN.md: Redis holds what operators set, not live state; whether an expert's
engine is ``loading`` (and at which phase), ``ready`` or ``failed`` is known only to the service's
pool replicas, which the service shows at ``GET /v1/models``. The registry CLI asks that endpoint
over HTTP (it never imports the service: imports flow ``coe -> expert_registry``), and says so
when no service answers instead of guessing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_SERVICE_URL = "http://127.0.0.1:8000"


@dataclass
class LiveView:
    """The service's view of the experts, or why there is none."""

    url: str
    experts: dict[str, dict] = field(default_factory=dict)  # name -> its /v1/models card
    error: str | None = None  # set when the service did not answer

    def status(self, name: str) -> str | None:
        """``loading: reading weights (12 s)``, ``ready``, ``failed``; None when unknown."""
        card = self.experts.get(name)
        if card is None:
            return None
        status = str(card.get("status") or "ready")
        if status == "loading":
            phase = card.get("phase") or card.get("status_reason")
            since = card.get("loading_s")
            return "loading" + (f": {phase}" if phase else "") + (f" ({since:.0f} s)" if since is not None else "")
        return status


def service_base(url: str | None) -> str:
    """The service's base URL from ``--service``/``COE_URL`` (the OpenAI base URL ``…/v1`` too)."""
    base = (url or DEFAULT_SERVICE_URL).rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def live_view(url: str | None, timeout_s: float = 2.0) -> LiveView:
    """Ask the service at ``url`` for ``/v1/models`` (with ``COE_API_KEY`` when set)."""
    import httpx

    base = service_base(url)
    key = os.environ.get("COE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(f"{base}/v1/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        return LiveView(base, error=f"service not running at {base} ({type(e).__name__})")
    if r.status_code != 200:
        return LiveView(base, error=f"the service at {base} answered {r.status_code} to /v1/models"
                                    + (" (set COE_API_KEY)" if r.status_code in (401, 403) else ""))
    try:
        cards = r.json().get("data") or []
    except ValueError:
        return LiveView(base, error=f"the service at {base} did not answer /v1/models with JSON")
    return LiveView(base, {c["id"]: c for c in cards if isinstance(c, dict) and c.get("kind") == "expert"})
