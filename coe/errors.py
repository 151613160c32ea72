"""Errors the engine layer, tier manager and expert pool raise.

Each one carries a one-line message a user can act on (which expert, which file, which budget).
Between processes (the pool and router deployments answering the ingress) an error travels as an
:class:`ErrorReport`: its kind per decision 2 of DESIGN.md, a code and the message, and no HTTP
status: only the ingress maps a report to HTTP (:func:`coe.api.errors.from_report`).
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field


class ErrorKind(str, enum.Enum):
    """The three kinds of decision 2, plus what is nobody's fault but coe's."""

    REQUEST = "request"  # this request cannot be served as sent; nothing else changes
    TRANSIENT = "transient"  # the expert is briefly unavailable (retried inside its replica)
    PERMANENT = "permanent"  # the expert cannot be served until its entry or files change
    INTERNAL = "internal"  # a coe bug


class ErrorReport(BaseModel):
    """An error as it crosses a process boundary (a deployment's answer to the ingress).

    ``code`` is the OpenAI ``error.code`` the client will see (``model_not_found``,
    ``context_length_exceeded``, ``expert_load_failed``, ``queue_full`` …), ``param`` the request
    field at fault, ``retry_after_s`` when trying again makes sense."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ErrorKind
    code: str | None = None
    message: str
    param: str | None = None
    retry_after_s: float | None = Field(None, ge=0)


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


class EngineStalled(ExpertTransientError):
    """A request's engine gave no token for ``pool.stall_timeout_s`` (DESIGN decision 10: no wait
    without bound). The request ends with this error; the pool restarts the engine once its session
    has drained, so a wedged engine does not hold the next requests too."""

    def __init__(self, name: str, stalled_s: float):
        super().__init__(name, f"its engine gave no token for {stalled_s:g} s (pool.stall_timeout_s); "
                         "it is restarted", retry_after_s=1.0)


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
