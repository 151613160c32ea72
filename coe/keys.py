"""API keys and their per-key limits, kept in the registry's Redis (decision 5 of DESIGN.md).

Every ingress replica, on every node, reads one set: ``coe keys add|remove|limits`` write it and a
running service sees the change within ``refresh_s`` (no restart, no file to copy around).

Storage (namespace ``ns``)::

    coe:{ns}:apikeys           hash  key id -> JSON of StoredKey (only sha256(key), never the key)
    coe:{ns}:apikeys:version   int   bumped on every change (what replicas poll)

Keys are 256-bit random tokens (``coe-`` + 43 characters), so an unsalted SHA-256 is enough to make
the stored value useless to a reader and lets a replica find the presented key with one dictionary
lookup; a deliberately slow hash would only hand unauthenticated clients a cheap way to burn CPU.
Keys given in the environment (``COE_API_KEYS`` / ``COE_ADMIN_KEYS``, e.g. a Kubernetes Secret) are
hashed at start and have no limits.

:class:`KeyRing` is the service side. :meth:`KeyRing.check` is the ONE function the auth middleware
calls: "this bearer token → who it is and what it may do". The ring keeps the last good set; when
the store becomes unreadable it keeps serving that set (fail closed: a key that was revoked while
Redis was down stays revoked, nobody gets in without one) and says so in ``health()``. When no set
was ever read (Redis down at start), :meth:`check` raises :class:`KeyStoreUnavailable` (a 503).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("coe.keys")

#: ``admin`` keys may also score feedback on requests made with other keys (``POST /v1/feedback``,
#: :meth:`coe.feedback.FeedbackStore.add`); there are no admin-only routes.
Role = Literal["user", "admin"]
KEY_PREFIX = "coe-"
ENV_KEYS = "COE_API_KEYS"
ENV_ADMIN_KEYS = "COE_ADMIN_KEYS"
NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
PERIODS_S: dict[str, int] = {"hour": 3600, "day": 86_400, "week": 7 * 86_400, "month": 30 * 86_400}


class KeyStoreUnavailable(Exception):
    """The key store could not be read and no earlier set is known: refuse (503), never open."""


class KeyLimits(BaseModel):
    """What one key may do; ``None`` = no limit. Enforced by :mod:`coe.tenant_limits` at the ingress,
    before any routing or queueing work."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    token_budget: int | None = Field(None, ge=1, description="tokens per budget period")
    budget_period: Literal["hour", "day", "week", "month"] = "month"
    experts: list[str] | None = Field(None, description="experts this key may use (None = all)")
    categories: list[str] | None = Field(None, description="categories this key may use (None = all)")
    feedback: bool = Field(True, description="may score its own answers with POST /v1/feedback (on by default, as "
                                             "for any user of a chat API; off for keys of untrusted end users)")

    def restricts_models(self) -> bool:
        return self.experts is not None or self.categories is not None


class StoredKey(BaseModel):
    """One key as stored: never the key itself."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    role: Role = "user"
    sha256: str
    hint: str
    created_at: str
    limits: KeyLimits = Field(default_factory=KeyLimits)
    source: Literal["redis", "env"] = "redis"

    def public(self) -> dict[str, Any]:
        """What ``coe keys list`` and the request scope show (no hash)."""
        return {"id": self.id, "name": self.name, "role": self.role, "hint": self.hint,
                "created_at": self.created_at, "source": self.source, "limits": self.limits.model_dump()}


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    """A fresh API key: ``coe-`` + 43 url-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _hint(key: str) -> str:
    return key[:8] + "…" if key.startswith(KEY_PREFIX) and len(key) >= 40 else "…"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def allowed_experts(limits: KeyLimits, category_map: Mapping[str, Any]) -> set[str] | None:
    """The experts a key may use: its experts plus those its categories map to (None = all)."""
    if not limits.restricts_models():
        return None
    out = set(limits.experts or [])
    for c in limits.categories or []:
        out.update(category_map.get(c, []))
    return out


# ------------------------------------------------------------------------------------- admin side
class RedisKeyStore:
    """Write side (``coe keys``) and read side (:class:`KeyRing`) of the keys in Redis."""

    def __init__(self, url: str, namespace: str = "default", *, client: redis.Redis | None = None,
                 socket_timeout: float = 2.0):
        self.namespace = namespace
        self.r = client or redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                                socket_connect_timeout=socket_timeout, decode_responses=True)
        self.hkey = f"coe:{namespace}:apikeys"
        self.vkey = f"coe:{namespace}:apikeys:version"

    def version(self) -> int:
        return int(self.r.get(self.vkey) or 0)

    def load(self) -> tuple[int, list[StoredKey]]:
        """(version, records), read in one transaction. A malformed entry is skipped and logged."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(self.vkey)
        pipe.hgetall(self.hkey)
        ver, raw = pipe.execute()
        out = []
        for kid, doc in (raw or {}).items():
            try:
                out.append(StoredKey.model_validate_json(doc))
            except ValidationError as e:
                log.error("API key entry %s in Redis is malformed and ignored: %s", kid, str(e).splitlines()[0])
        return int(ver or 0), out

    def list(self) -> list[StoredKey]:
        return sorted(self.load()[1], key=lambda k: k.created_at)

    def _write(self, fn) -> Any:
        """Run ``fn(records) -> (new_records_by_id, result)`` under WATCH, retrying on a race."""
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(self.hkey)
                    records = [StoredKey.model_validate_json(v) for v in pipe.hgetall(self.hkey).values()]
                    changes, result = fn(records)
                    pipe.multi()
                    for kid, rec in changes.items():
                        if rec is None:
                            pipe.hdel(self.hkey, kid)
                        else:
                            pipe.hset(self.hkey, kid, rec.model_dump_json())
                    pipe.incr(self.vkey)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue

    def add(self, name: str, role: Role = "user", limits: KeyLimits | None = None) -> tuple[str, StoredKey]:
        """Create a key; returns ``(plain key, record)``. The plain key is not stored anywhere."""
        if role not in ("user", "admin"):
            raise ValueError(f"role must be 'user' or 'admin', got {role!r}")
        if not NAME_RE.fullmatch(name or ""):
            raise ValueError(f"invalid key name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ @ -")
        key = new_key()
        rec = StoredKey(id=secrets.token_hex(4), name=name, role=role, sha256=key_hash(key), hint=_hint(key),
                        created_at=_now(), limits=limits or KeyLimits())

        def plan(records: list[StoredKey]):
            if any(r.name == name for r in records):
                raise ValueError(f"a key named {name!r} already exists (remove it first)")
            return {rec.id: rec}, rec

        return key, self._write(plan)

    def _find(self, records: list[StoredKey], name_or_id: str) -> StoredKey:
        for r in records:
            if name_or_id in (r.name, r.id):
                return r
        raise KeyError(f"no key named or with id {name_or_id!r}")

    def remove(self, name_or_id: str) -> StoredKey:
        def plan(records: list[StoredKey]):
            rec = self._find(records, name_or_id)
            return {rec.id: None}, rec

        return self._write(plan)

    def set_limits(self, name_or_id: str, **changes: Any) -> StoredKey:
        """Change some limits of a key (validated; unknown names fail with the name)."""
        def plan(records: list[StoredKey]):
            rec = self._find(records, name_or_id)
            limits = KeyLimits.model_validate({**rec.limits.model_dump(), **changes})
            new = rec.model_copy(update={"limits": limits})
            return {rec.id: new}, new

        return self._write(plan)


# ------------------------------------------------------------------------------------- service side
def _env_records(env: Mapping[str, str]) -> list[StoredKey]:
    out = []
    for var, role in ((ENV_KEYS, "user"), (ENV_ADMIN_KEYS, "admin")):
        for i, k in enumerate(x.strip() for x in (env.get(var) or "").split(",") if x.strip()):
            out.append(StoredKey(id=f"env-{role}-{i}", name=f"env-{role}-{i}", role=role, sha256=key_hash(k),
                                 hint="…", created_at=_now(), source="env"))
    return out


class KeyRing:
    """The keys a running replica accepts: the environment's plus the last good set read from Redis.

    Re-reads Redis when its version changes (checked at most every ``refresh_s``; the check runs in
    the caller's thread, a ~0.2 ms GET). ``KeyRing(None)`` serves only the environment's keys."""

    def __init__(self, store: RedisKeyStore | None, env: Mapping[str, str] | None = None,
                 refresh_s: float = 1.0, clock: Any = time.monotonic):
        self.store = store
        self._env = {r.sha256: r for r in _env_records(os.environ if env is None else env)}
        self._redis: dict[str, StoredKey] | None = None  # None: never read
        self._version = -1
        self._checked = float("-inf")
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self.error: str | None = None
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Re-read the set if it changed; on failure keep the last good one (fail closed)."""
        if self.store is None:
            self._redis = {}
            return
        now = self._clock()
        if not force and now - self._checked < self._refresh_s:
            return
        with self._lock:
            self._checked = now
            try:
                if not force and self._redis is not None and self.store.version() == self._version:
                    self.error = None
                    return
                ver, records = self.store.load()
            except redis.RedisError as e:
                msg = f"key store unreadable ({type(e).__name__}); "
                msg += (f"keeping the last good set of {len(self._redis)} key(s)" if self._redis is not None
                        else "refusing every request that needs a key until it is back")
                if msg != self.error:
                    log.error("%s", msg)
                self.error = msg
                return
            self._redis = {r.sha256: r for r in records}
            self._version = ver
            self.error = None

    def fresh(self) -> bool:
        """True when a check now answers from memory (the copy was checked less than
        ``refresh_s`` ago): the ingress then checks a key in its event loop, not in a thread."""
        return self.store is None or self._clock() - self._checked < self._refresh_s

    @property
    def configured(self) -> bool:
        """True when any key exists (then every protected route needs one). Unknown (never read)
        counts as configured: fail closed."""
        self.refresh()
        return self._redis is None or bool(self._redis or self._env)

    def check(self, token: str | None) -> StoredKey | None:
        """Who ``token`` is (record with role and limits), or None when it matches no key.
        Raises :class:`KeyStoreUnavailable` when the set was never read."""
        self.refresh()
        if self._redis is None:
            raise KeyStoreUnavailable(self.error or "the key store has not been read yet")
        if not token:
            return None
        h = key_hash(token)
        return self._env.get(h) or self._redis.get(h)

    def verify(self, token: str | None) -> StoredKey | None:
        """:meth:`check` under the name the older middleware calls (never-read store: no match)."""
        try:
            return self.check(token)
        except KeyStoreUnavailable:
            return None

    @property
    def records(self) -> list[StoredKey]:
        return list(self._env.values()) + list((self._redis or {}).values())

    def health(self) -> dict[str, Any]:
        return {"keys": len(self.records), "store": "ok" if self.error is None else "unreadable",
                "detail": self.error}


# ------------------------------------------------------------------------------------- the replica's ring
_SERVICE: dict[str, KeyRing] = {}


def service_ring() -> KeyRing:
    """The ring this process serves with (set by the ingress replica; environment keys until then).

    It lives here, on an imported module, because Ray Serve pickles the FastAPI app and its
    middleware with the deployment: a module global of the ingress module read from a pickled
    closure can be a copy, so the middleware would never see the ring the replica configured."""
    ring = _SERVICE.get("ring")
    if ring is None:
        ring = _SERVICE["ring"] = KeyRing(None)
    return ring


def set_service_ring(ring: KeyRing) -> None:
    _SERVICE["ring"] = ring
