"""Errors the engine layer, tier manager and expert pool raise.

Each one carries a one-line message a user can act on (which expert, which file, which budget);
the serve layer maps them to OpenAI-shaped error responses.
"""

from __future__ import annotations


class CoeError(Exception):
    """Base of every error coe raises on purpose."""


class RequestError(CoeError):
    """What one request contains cannot be served (its messages fail the chat template or the
    tokenizer, its text cannot be encoded). Decision 2 of DESIGN.md: a 400 for that request only;
    it never marks the expert failed and never starts the fallback cascade, because the next
    request to the same expert may be fine.

    ``param`` names the offending request field (OpenAI ``error.param``), ``code`` the error code."""

    def __init__(self, message: str, param: str | None = "messages", code: str = "invalid_prompt"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ExpertTooLarge(CoeError):
    """The expert's weights do not fit a tier budget of this pool (raised when it is added)."""


class ExpertLoadError(CoeError):
    """The expert's files are missing, unreadable or corrupt; the pool marks it failed with the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"expert {name!r} could not be loaded: {reason}")
        self.name = name
        self.reason = reason


class ExpertNotServed(CoeError):
    """No expert of that name is in this pool (never added, or being removed)."""


class ExpertExistsInPool(CoeError):
    """An expert of that name is already in this pool."""


class QueueFull(CoeError):
    """The expert's request queue is at ``max_queue_per_expert``; retry later (HTTP 429)."""


class PoolClosed(CoeError):
    """The pool was closed; no new requests are accepted."""


class EngineNotResident(CoeError):
    """Generation was asked of an engine whose weights are not in the active tier (a coe bug)."""


class ExpertTransientError(CoeError):
    """Loading or waking the expert failed for a reason that passes (out of memory, a timeout).

    Decision 2 of DESIGN.md: the pool retries with backoff by itself and the registry is not
    touched; meanwhile requests go to the next-best expert. ``retry_after_s`` says when the pool
    tries again."""

    def __init__(self, name: str, reason: str, retry_after_s: float = 0.0):
        super().__init__(f"expert {name!r} is temporarily unavailable: {reason}")
        self.name = name
        self.reason = reason
        self.retry_after_s = float(retry_after_s)


class ExpertStarting(CoeError):
    """The expert's engine is still starting after it was added (``loading`` with a phase), and
    the request waited as long as it was allowed to (``limits.loading_wait_s`` or the client's
    ``X-Coe-Wait-Timeout``). Not a failure: the start goes on; the ingress answers 503 with
    ``Retry-After``, or sends a routed request to the next-best expert at once."""

    def __init__(self, name: str, phase: str, started_s: float, retry_after_s: float):
        what = f"{phase}, " if phase else ""
        super().__init__(f"expert {name!r} is still loading ({what}{started_s:.0f} s since it was added); "
                         f"retry in {retry_after_s:.0f} s")
        self.name = name
        self.phase = phase
        self.started_s = float(started_s)
        self.retry_after_s = float(retry_after_s)
