"""Feedback from use (issue 14, item 6): which expert answered a request, and what the user thought.

Two sets live in the registry's Redis (namespace ``ns``), both bounded and expiring, because a
feedback record is an operator-visible state change (DESIGN decision 3), not a live statistic:

    coe:{ns}:fb:req:{key}/{request id}   string  JSON RequestRecord, expires after ``request_ttl_s`` (24 h)
    coe:{ns}:fb:owners:{request id}      set     the keys that used that id (an admin's feedback by id)
    coe:{ns}:fb:reqs               zset    {key}/{request id} -> time; beyond ``max_requests`` the oldest go
    coe:{ns}:fb:records            hash    {key}/{request id} -> JSON FeedbackRecord (one per request)
    coe:{ns}:fb:records:index      zset    {key}/{request id} -> time; older than ``record_ttl_s`` or
                                           beyond ``max_records`` they are dropped

``{key}`` is the id of the API key that made the request (``-`` with auth off): a request id is a
key's own, whoever else sends the same ``X-Request-Id``.
    coe:{ns}:fb:quota:{key}:{expert}:{UTC day}   int   new records a key gave an expert that day
    coe:{ns}:fb:version            int     bumped on every feedback change
    channel coe:{ns}:feedback              the {key}/{request id} of each change (router replicas listen)

Rules a user notices: feedback on an unknown or expired request id is :class:`UnknownRequest`
(404); feedback on a request made with another key is the same 404 (an id is no capability); a
second feedback for one request id replaces the first, never adds; one key adds at most
``per_key_expert_day`` new records per expert per UTC day (:class:`FeedbackLimit`, 429), so no
key can move an expert by more than that. Nothing here speaks HTTP: the ingress maps the errors.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("coe.feedback")

DAY_S = 86_400


class FeedbackConfig(BaseModel):
    """Retention and caps of the feedback sets (``feedback:`` in the service config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="keep which expert answered each request (and its prompt) so that "
                                            "POST /v1/feedback can score it; off: nothing is kept, feedback is 501")
    request_ttl_s: int = Field(DAY_S, ge=60, description="how long a request can still be given feedback")
    max_requests: int = Field(10_000, ge=1, description="request records kept at most (oldest dropped first)")
    max_prompt_chars: int = Field(2_000, ge=100, description="prompt text kept per request (head and tail)")
    record_ttl_s: int = Field(30 * DAY_S, ge=60, description="how long a feedback record keeps moving routing")
    max_records: int = Field(20_000, ge=1, description="feedback records kept at most (oldest dropped first)")
    per_key_expert_day: int = Field(50, ge=1, description="new feedback records one key may add per expert per "
                                                         "UTC day: the cap on how much one key moves an expert")


class RequestRecord(BaseModel):
    """Who answered one request: what feedback on it will be recorded against."""

    request_id: str
    expert: str
    category: str | None = None
    prompt: str
    key_id: str | None = None  # the key that made the request (None: auth off)
    at: float


class FeedbackRecord(BaseModel):
    """One evaluation record from use: ``expert`` scored ``score`` (0..1) on ``prompt``."""

    request_id: str
    expert: str
    category: str | None = None
    prompt: str
    score: float = Field(ge=0.0, le=1.0)
    key_id: str | None = None
    at: float


class UnknownRequest(Exception):
    """No request with this id is known for this key (never seen, expired, or another key's)."""


class FeedbackLimit(Exception):
    """The key has added its daily number of feedback records for this expert."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def clip_prompt(text: str, max_chars: int) -> str:
    """At most ``max_chars`` of ``text``: its head and tail (what the router's encoder reads too)."""
    if len(text) <= max_chars:
        return text
    half = (max_chars - 3) // 2
    return text[:half] + "\n…\n" + text[-half:]


def feedback_channel(namespace: str) -> str:
    return f"coe:{namespace}:feedback"


class FeedbackStore:
    """The Redis side of feedback: written by the ingress, read by the router replicas."""

    def __init__(self, url: str | None, namespace: str = "default", config: FeedbackConfig | None = None, *,
                 client: redis.Redis | None = None, clock: Any = time.time):
        self.cfg = config or FeedbackConfig()
        self.namespace = namespace
        self.r = client or redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2,  # type: ignore[arg-type]
                                                decode_responses=True)
        self.clock = clock
        p = f"coe:{namespace}:fb"
        self.reqs, self.records_key, self.index = f"{p}:reqs", f"{p}:records", f"{p}:records:index"
        self.version_key = f"{p}:version"
        self.prefix = p
        self.channel = feedback_channel(namespace)

    def _req_key(self, sid: str) -> str:
        return f"{self.prefix}:req:{sid}"

    @staticmethod
    def stored_id(request_id: str, key_id: str | None) -> str:
        """Where ``request_id`` of ``key_id`` is kept: ids are namespaced by the key that made the
        request (DESIGN decision 8), so a client that sends another tenant's ``X-Request-Id`` gets a
        request of its own, and its feedback can never reach the other's (issue 24 item 5)."""
        return f"{key_id or '-'}/{request_id}"

    def _owners_key(self, rid: str) -> str:
        return f"{self.prefix}:owners:{rid}"

    # ---- requests (ingress, once per answered request) ------------------------------------------
    def remember(self, request_id: str, expert: str, category: str | None, prompt: str,
                 key_id: str | None) -> None:
        """Keep who answered ``request_id`` for ``request_ttl_s``; drop the oldest beyond the cap."""
        now = self.clock()
        rec = RequestRecord(request_id=request_id, expert=expert, category=category,
                            prompt=clip_prompt(prompt, self.cfg.max_prompt_chars), key_id=key_id, at=now)
        sid = self.stored_id(request_id, key_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self._req_key(sid), rec.model_dump_json(), ex=self.cfg.request_ttl_s)
        pipe.sadd(self._owners_key(request_id), key_id or "-")  # for an admin's feedback by the bare id
        pipe.expire(self._owners_key(request_id), self.cfg.request_ttl_s)
        pipe.zadd(self.reqs, {sid: now})
        pipe.zremrangebyscore(self.reqs, "-inf", now - self.cfg.request_ttl_s)
        pipe.zcard(self.reqs)
        n = pipe.execute()[-1]
        over = int(n) - self.cfg.max_requests
        if over > 0:  # the cap: forget the oldest requests (their feedback, if any, stays)
            old = [m for m, _ in self.r.zpopmin(self.reqs, over)]
            if old:
                self.r.delete(*(self._req_key(m) for m in old))

    def request(self, request_id: str, key_id: str | None = None) -> RequestRecord | None:
        """The request ``key_id`` made under ``request_id`` (None: unknown or expired)."""
        raw = self.r.get(self._req_key(self.stored_id(request_id, key_id)))
        return RequestRecord.model_validate_json(raw) if raw else None

    def _request_for(self, request_id: str, key_id: str | None, admin: bool) -> RequestRecord | None:
        """The caller's own request of that id; for an admin key, else the one request of that id
        any key made (several keys used the id: ambiguous, so none)."""
        req = self.request(request_id, key_id)
        if req is not None or not admin:
            return req
        owners = self.r.smembers(self._owners_key(request_id))
        if len(owners) != 1:
            return None
        (owner,) = owners
        return self.request(request_id, None if owner == "-" else owner)

    # ---- feedback (ingress, POST /v1/feedback) ---------------------------------------------------
    def add(self, request_id: str, score: float, key_id: str | None, admin: bool = False) -> tuple[FeedbackRecord, bool]:
        """Record ``score`` for the expert that answered ``request_id``; returns (record, replaced).

        The caller's key must be the one that made the request (an admin key may score any).
        Raises :class:`UnknownRequest` or :class:`FeedbackLimit`."""
        req = self._request_for(request_id, key_id, admin)
        if req is None:
            raise UnknownRequest(f"no request '{request_id}' is known for this key (unknown, made with another key, "
                                 f"or older than {self.cfg.request_ttl_s // 3600} h)")
        sid = self.stored_id(request_id, req.key_id)
        now = self.clock()
        day = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%d")
        quota = f"{self.prefix}:quota:{key_id or '-'}:{req.expert}:{day}"
        rec = FeedbackRecord(request_id=request_id, expert=req.expert, category=req.category, prompt=req.prompt,
                             score=float(score), key_id=key_id, at=now)
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(self.records_key, quota)
                    replaced = bool(pipe.hexists(self.records_key, sid))
                    used = int(pipe.get(quota) or 0)
                    if not replaced and used >= self.cfg.per_key_expert_day:
                        until = 86_400 - int(now % 86_400)
                        raise FeedbackLimit(f"this key has given {used} feedback records for expert '{req.expert}' "
                                            f"today (feedback.per_key_expert_day); more count from 00:00 UTC",
                                            max(1, until))
                    stale = [m for m in pipe.zrangebyscore(self.index, "-inf", now - self.cfg.record_ttl_s)
                             if m != sid]
                    excess = int(pipe.zcard(self.index)) - len(stale) + (0 if replaced else 1) - self.cfg.max_records
                    if excess > 0:  # the cap: the oldest records go (never the one being written)
                        gone = set(stale)
                        oldest = pipe.zrange(self.index, 0, excess + len(stale))
                        stale += [m for m in oldest if m not in gone and m != sid][:excess]
                    pipe.multi()
                    pipe.hset(self.records_key, sid, rec.model_dump_json())
                    pipe.zadd(self.index, {sid: now})
                    if stale:
                        pipe.hdel(self.records_key, *stale)
                        pipe.zrem(self.index, *stale)
                    if not replaced:
                        pipe.incr(quota)
                        pipe.expire(quota, 2 * DAY_S)
                    pipe.incr(self.version_key)
                    pipe.publish(self.channel, sid)
                    pipe.execute()
                    return rec, replaced
                except redis.WatchError:
                    continue

    # ---- reading (router replicas) ----------------------------------------------------------------
    def version(self) -> int:
        return int(self.r.get(self.version_key) or 0)

    def record(self, sid: str) -> FeedbackRecord | None:
        """The record kept under ``sid`` (:meth:`stored_id`; what the channel announces)."""
        raw = self.r.hget(self.records_key, sid)
        return _parse(sid, raw) if raw else None

    def records(self) -> tuple[int, dict[str, FeedbackRecord]]:
        """(version, every record not older than ``record_ttl_s``), read in one transaction."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.version_key)
        pipe.hgetall(self.records_key)
        ver, raw = pipe.execute()
        cutoff = self.clock() - self.cfg.record_ttl_s
        out = {}
        for rid, doc in (raw or {}).items():
            rec = _parse(rid, doc)
            if rec is not None and rec.at >= cutoff:
                out[rid] = rec
        return int(ver or 0), out


def _parse(rid: str, doc: str) -> FeedbackRecord | None:
    try:
        return FeedbackRecord.model_validate(json.loads(doc))
    except (ValueError, TypeError) as e:
        log.error("feedback record %s is malformed and ignored: %s", rid, str(e).splitlines()[0])
        return None
