"""Per-key request and token limits (RPM, TPM, a token budget per period), enforced at the ingress
before any routing or queueing work, the way LiteLLM's virtual keys do.

Counters are fixed windows in Redis, shared by every ingress replica (one key's traffic may land on
any of them), checked and reserved atomically by one Lua script::

    coe:{ns}:usage:{key id}:rpm:{minute}      requests in this minute
    coe:{ns}:usage:{key id}:tpm:{minute}      tokens in this minute
    coe:{ns}:usage:{key id}:budget:{period}   tokens in this budget period

They expire with their window, so nothing is written periodically and nothing outlives its use
(decision 3 of DESIGN.md keeps live statistics out of Redis; these are enforcement state, touched
once per request). A token limit reserves an upper bound up front (:func:`prompt_token_bound`:
the prompt's UTF-8 bytes plus the chat template's overhead, + ``max_tokens`` per choice) and
:meth:`Reservation.settle` gives back the difference to the true count after. The ingress has no
tokenizer; characters / 4 under-counted emoji about 12× (issue 24 item 8), so it counts bytes:
every tokenizer coe serves (byte-level BPE, SentencePiece with byte fallback) spends at most one
token per byte, so concurrent requests can never together pass a limit on their estimates.
A refusal is a 429 with ``Retry-After`` = seconds until the window that refused ends.

If Redis cannot be reached the request is admitted and the failure logged (limits are about sharing,
the key check itself fails closed in :mod:`coe.keys`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from coe.keys import PERIODS_S, KeyLimits, StoredKey

log = logging.getLogger("coe.tenant_limits")

DEFAULT_MAX_TOKENS_ESTIMATE = 256  # when the request does not say (the expert default is not known yet)

# KEYS: rpm, tpm, budget counters. ARGV: limits (0 = none), tokens, ttls (s).
# Returns {0} when admitted, else {which (1 rpm, 2 tpm, 3 budget), current}.
_RESERVE = """
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}
local cost = {1, tonumber(ARGV[4]), tonumber(ARGV[4])}
local ttl = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])}
for i = 1, 3 do
  if limits[i] > 0 then
    local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
    if cur + cost[i] > limits[i] then return {i, cur} end
  end
end
for i = 1, 3 do
  if limits[i] > 0 then
    redis.call('INCRBY', KEYS[i], cost[i])
    redis.call('EXPIRE', KEYS[i], ttl[i])
  end
end
return {0, 0}
"""

# KEYS: counters to correct. ARGV: delta. Only counters that still exist (their window is open).
_SETTLE = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[1]) end
end
return 0
"""


class LimitExceeded(Exception):
    """A key's limit refused the request; ``retry_after_s`` until the refusing window ends."""

    def __init__(self, message: str, limit: str, retry_after_s: int):
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


#: tokens a chat template adds per message (role markers, separators) and per request (BOS, the
#: generation prompt, a short default system line), at most, for the templates coe has seen
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS_PER_REQUEST = 32


def prompt_token_bound(messages: list[dict[str, Any]]) -> int:
    """An upper bound on the prompt's tokens without a tokenizer: its UTF-8 bytes (text content
    and names) plus the template's overhead. An expert's persona is added by the pool and is
    counted when the reservation settles."""
    total = TEMPLATE_TOKENS_PER_REQUEST
    for m in messages:
        content = m.get("content")
        text = content if isinstance(content, str) else str(content or "")
        total += TEMPLATE_TOKENS_PER_MESSAGE + len(text.encode("utf-8", "surrogatepass"))
        total += len(str(m.get("name") or "").encode("utf-8", "surrogatepass"))
    return total


def estimate_tokens(prompt_tokens: int, max_tokens: int | None, n: int = 1) -> int:
    """What a request may cost before it runs: its prompt's bound + max_tokens per choice."""
    return int(prompt_tokens) + (max_tokens or DEFAULT_MAX_TOKENS_ESTIMATE) * max(n, 1)


@dataclass
class Reservation:
    """Tokens reserved for one admitted request; :meth:`settle` once with the true count."""

    limiter: "TenantLimiter | None"
    counters: list[str] = field(default_factory=list)  # token counters holding the estimate
    estimate: int = 0
    settled: bool = False

    def settle(self, true_tokens: int) -> None:
        if self.settled or self.limiter is None:
            return
        self.settled = True
        if self.counters and true_tokens != self.estimate:
            self.limiter._settle(self.counters, true_tokens - self.estimate)


class TenantLimiter:
    """Checks and reserves a key's limits in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis | None, namespace: str, clock: Any = time.time):
        self.r = client
        self.ns = namespace
        self._clock = clock
        self._reserve = client.register_script(_RESERVE) if client is not None else None
        self._settle_script = client.register_script(_SETTLE) if client is not None else None

    def _windows(self, key_id: str, limits: KeyLimits) -> tuple[list[str], list[int], list[int]]:
        now = self._clock()
        minute = int(now // 60)
        period_s = PERIODS_S[limits.budget_period]
        period = int(now // period_s)
        base = f"coe:{self.ns}:usage:{key_id}"
        keys = [f"{base}:rpm:{minute}", f"{base}:tpm:{minute}", f"{base}:budget:{limits.budget_period}:{period}"]
        left = [max(1, math.ceil((minute + 1) * 60 - now))] * 2 + [max(1, math.ceil((period + 1) * period_s - now))]
        ttls = [left[0] + 5, left[1] + 5, left[2] + 60]
        return keys, left, ttls

    def admit(self, key: StoredKey | None, tokens: int) -> Reservation:
        """Reserve one request and ``tokens`` for ``key``; raises :class:`LimitExceeded` (→ 429)."""
        if key is None or self._reserve is None:
            return Reservation(None)
        lim = key.limits
        if lim.rpm is None and lim.tpm is None and lim.token_budget is None:
            return Reservation(None)
        keys, left, ttls = self._windows(key.id, lim)
        args = [lim.rpm or 0, lim.tpm or 0, lim.token_budget or 0, tokens, *ttls]
        try:
            which, cur = self._reserve(keys=keys, args=args)
        except redis.RedisError as e:
            log.warning("per-key limits not enforced for this request: Redis error %s", type(e).__name__)
            return Reservation(None)
        if which == 1:
            raise LimitExceeded(f"key '{key.name}' is at its limit of {lim.rpm} requests per minute", "rpm", left[0])
        if which == 2:
            raise LimitExceeded(f"key '{key.name}' is at its limit of {lim.tpm} tokens per minute ({cur} used, "
                                f"this request reserves ~{tokens})", "tpm", left[1])
        if which == 3:
            raise LimitExceeded(f"key '{key.name}' has used its budget of {lim.token_budget} tokens per "
                                f"{lim.budget_period} ({cur} used, this request reserves ~{tokens})", "budget",
                                left[2])
        counters = [k for k, on in zip(keys[1:], (lim.tpm, lim.token_budget)) if on]
        return Reservation(self, counters, tokens)

    def rpm_full(self, key_id: str, limits: KeyLimits) -> int | None:
        """Seconds until ``key_id``'s request window has room again when it is full now, else None:
        the check made before a body is read (nothing is reserved; :meth:`admit` does that)."""
        if self.r is None or not limits.rpm:
            return None
        keys, left, _ = self._windows(key_id, limits)
        try:
            used = int(self.r.get(keys[0]) or 0)
        except redis.RedisError:
            return None  # admitted; admit() logs the failure
        return left[0] if used >= limits.rpm else None

    def _settle(self, counters: list[str], delta: int) -> None:
        try:
            self._settle_script(keys=counters, args=[delta])
        except redis.RedisError as e:
            log.warning("could not settle per-key token usage: %s", type(e).__name__)

    def usage(self, key: StoredKey) -> dict[str, int]:
        """The current windows' counts for ``key`` (``coe keys usage``)."""
        keys, _, _ = self._windows(key.id, key.limits)
        vals = self.r.mget(keys) if self.r is not None else [None] * 3
        return {n: int(v or 0) for n, v in zip(("requests_this_minute", "tokens_this_minute",
                                               f"tokens_this_{key.limits.budget_period}"), vals)}
