"""The registry store: experts and the category map in Redis, changes announced on pub/sub.

Keys of a namespace ``ns`` (several deployments can share one Redis):

* ``coe:<ns>:experts``  hash  name -> Expert JSON
* ``coe:<ns>:map``      string  category map JSON (category -> ordered expert names)
* ``coe:<ns>:version``  string  integer, +1 per change
* ``coe:<ns>:events``   pub/sub channel: one JSON :class:`RegistryEvent` per change

Every write is one optimistic transaction: WATCH the three keys, read, validate, then
MULTI / (HSET|HDEL|SET map) / SET version / PUBLISH ... / EXEC. If another process wrote in
between, EXEC fails and the write is retried on fresh data. So a write either happens whole,
with its events, or not at all; validation errors are raised before MULTI and change nothing.
Each event carries the version the change produced, so versions seen by a subscriber are
consecutive; a gap means events were missed (e.g. a reconnect) and the consumer should re-read
:meth:`RedisRegistry.snapshot`.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from expert_registry.embedded import mask_url
from expert_registry.errors import (
    ExpertExists,
    ExpertInUse,
    ExpertNotFound,
    InvalidCategoryMap,
    InvalidExpert,
    RedisUnavailable,
    RegistryBusy,
    RegistryError,
)
from expert_registry.spec import (
    SCHEMA_VERSION,
    CategoryMap,
    Expert,
    explain_validation_error,
    parse_category_map,
    parse_expert,
    utcnow,
)

log = logging.getLogger("coe.registry")

NAMESPACE_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
EXPORT_FORMAT = 1
Op = Literal["add", "update", "remove", "map", "status"]
_T = TypeVar("_T")
_MAX_ATTEMPTS = 1000
_IMMUTABLE = frozenset({"name", "created_at", "updated_at"})


class RegistryEvent(BaseModel):
    """One change, as published on ``coe:<namespace>:events``.

    ``fields``: for ``update`` the changed fields, for ``map`` the categories that changed,
    for ``status`` ``["status", "status_reason"]``."""

    model_config = ConfigDict(extra="ignore")

    version: int
    op: Op
    name: str | None = None
    fields: list[str] = Field(default_factory=list)
    namespace: str
    ts: datetime = Field(default_factory=utcnow)


@dataclass(frozen=True)
class RegistrySnapshot:
    """Version, experts and category map read in one MULTI, so they agree with each other."""

    version: int
    experts: dict[str, Expert]
    category_map: CategoryMap
    #: stored entries that could not be read (name -> one-line reason): skipped, never fatal
    invalid: dict[str, str] = field(default_factory=dict)


@dataclass
class _Plan:
    """What a write will do, decided (and validated) while the keys are WATCHed."""

    put: dict[str, Expert] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    new_map: CategoryMap | None = None
    events: list[tuple[Op, str | None, list[str]]] = field(default_factory=list)


def _redis_errors(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Turn connection-level failures into :class:`RedisUnavailable` naming the URL."""

    @functools.wraps(fn)
    def wrapper(self: RedisRegistry, *args: Any, **kwargs: Any) -> _T:
        try:
            return fn(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, OSError) as err:
            raise RedisUnavailable(f"cannot reach Redis at {mask_url(self.url)}: {err}") from None
        except redis.ResponseError as err:
            raise RegistryError(f"Redis at {mask_url(self.url)} refused the operation: {err}") from None

    return wrapper


class PublishedCategories(BaseModel):
    """What a service writes to ``coe:<ns>:categories`` when it has loaded its router."""

    model_config = ConfigDict(extra="ignore")
    categories: list[str]
    source: str  # where the router came from (its path, or "default")
    published_at: float


class RedisRegistry:
    """Experts and category map of one namespace in one Redis. Thread-safe (redis-py pools)."""

    def __init__(self, url: str, namespace: str = "default", *, socket_timeout: float = 10.0):
        if not re.match(NAMESPACE_PATTERN, namespace or ""):
            raise RegistryError(f"invalid namespace {namespace!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
        self.url = url
        self.namespace = namespace
        prefix = f"coe:{namespace}"
        self.k_experts, self.k_map, self.k_version = f"{prefix}:experts", f"{prefix}:map", f"{prefix}:version"
        self.k_categories = f"{prefix}:categories"  # the loaded router's category set (decision 6)
        self.channel = f"{prefix}:events"
        try:
            self._r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout,
                                           socket_connect_timeout=min(socket_timeout, 5.0))
        except ValueError as err:
            raise RedisUnavailable(f"invalid Redis URL {mask_url(url)}: {err}") from None

    @classmethod
    def connect(cls, url: str | None = None, namespace: str | None = None) -> RedisRegistry:
        """The registry as the CLI finds it: ``url`` > ``$COE_REDIS_URL`` > embedded Redis,
        ``namespace`` > ``$COE_NAMESPACE`` > ``default``. Checks that Redis answers."""
        import os

        from expert_registry.embedded import resolve_redis_url

        reg = cls(resolve_redis_url(url), namespace or os.environ.get("COE_NAMESPACE") or "default")
        reg.ping()
        return reg

    def __repr__(self) -> str:
        return f"RedisRegistry({mask_url(self.url)!r}, namespace={self.namespace!r})"

    def close(self) -> None:
        self._r.close()

    # ------------------------------------------------------------------ reads

    @_redis_errors
    def ping(self) -> None:
        """Raise :class:`RedisUnavailable` unless Redis answers."""
        self._r.ping()

    @_redis_errors
    def version(self) -> int:
        """The registry version: 0 when empty, +1 per change (add, update, remove, map, status)."""
        return int(self._r.get(self.k_version) or 0)

    @_redis_errors
    def get(self, name: str) -> Expert:
        raw = self._r.hget(self.k_experts, name)
        if raw is None:
            raise ExpertNotFound(f"no expert named {name!r} in namespace {self.namespace!r}")
        return self._decode(name, raw)

    @_redis_errors
    def list(self) -> list[Expert]:
        """All readable experts, sorted by name (unreadable entries are skipped: :meth:`invalid`)."""
        return list(self._decode_all(self._r.hgetall(self.k_experts))[0].values())

    @_redis_errors
    def invalid(self) -> dict[str, str]:
        """Stored entries that cannot be read (name -> why); ``list``/``snapshot`` skip them."""
        return self._decode_all(self._r.hgetall(self.k_experts))[1]

    def exists(self, name: str) -> bool:
        return bool(self._call(self._r.hexists, self.k_experts, name))

    @_redis_errors
    def get_map(self) -> CategoryMap:
        return self._decode_map(self._r.get(self.k_map))

    @_redis_errors
    def snapshot(self) -> RegistrySnapshot:
        """Version + experts + map in one MULTI/EXEC, i.e. one consistent point in time."""
        pipe = self._r.pipeline(transaction=True)
        pipe.get(self.k_version)
        pipe.hgetall(self.k_experts)
        pipe.get(self.k_map)
        version, raw, raw_map = pipe.execute()
        experts, invalid = self._decode_all(raw)
        map_err = self.map_error(raw_map)
        if map_err is not None:  # listed with the invalid entries (/healthz, coe_registry_invalid_entries)
            invalid = {**invalid, "(category map)": map_err}
        return RegistrySnapshot(int(version or 0), experts, self._decode_map(raw_map), invalid)

    @_redis_errors
    def categories(self) -> PublishedCategories | None:
        """The category set the serving router published (None until a service has started)."""
        raw = self._r.get(self.k_categories)
        if raw is None:
            return None
        try:
            return PublishedCategories.model_validate_json(raw)
        except ValidationError:
            return None  # written by another version: treated as not published

    @_redis_errors
    def publish_categories(self, categories: Iterable[str], source: str) -> None:
        """Record the loaded router's categories, so ``coe-registry`` refuses names it cannot route.

        A rare state change (once per service start), not a statistic: decision 3 allows it."""
        pub = PublishedCategories(categories=sorted(categories), source=source, published_at=time.time())
        self._r.set(self.k_categories, pub.model_dump_json())

    def export(self) -> dict[str, Any]:
        """A plain dict (for YAML/JSON) that :meth:`import_experts` restores exactly."""
        snap = self.snapshot()
        return {
            "format": EXPORT_FORMAT,
            "namespace": self.namespace,
            "version": snap.version,
            "experts": [e.model_dump(mode="json") for e in snap.experts.values()],
            "category_map": snap.category_map,
        }

    # ------------------------------------------------------------------ writes

    def add(self, expert: Expert, to_map: Iterable[str] = ()) -> int:
        """Register a new expert; :class:`ExpertExists` if the name is taken. Returns the new version.
        ``to_map``: categories whose map entry gets the expert appended (last: least preferred), in
        the same transaction, so it is never registered without the routing it was added with."""
        expert = parse_expert(expert)
        cats = list(dict.fromkeys(to_map))

        def plan(view: _View) -> _Plan:
            if view.has(expert.name):
                raise ExpertExists(f"expert {expert.name!r} already exists in namespace {self.namespace!r}")
            p = _Plan(put={expert.name: expert}, events=[("add", expert.name, [])])
            if cats:
                cmap = dict(view.category_map())
                new = parse_category_map({**cmap, **{c: [*cmap.get(c, []), expert.name] for c in cats}})
                mp = self._plan_map(view, new, known=view.names() | {expert.name})
                p.new_map, p.events = mp.new_map, p.events + mp.events
            return p

        return self._write(plan)

    def update(self, name: str, /, **fields: Any) -> int:
        """Change fields of an expert. ``generation`` and ``capabilities`` given as dicts are merged
        into the current ones (a capability set to None is removed). No-op if nothing changes."""
        bad = sorted(_IMMUTABLE & fields.keys())
        if bad:
            raise InvalidExpert(f"expert {name!r}: field(s) {', '.join(bad)} cannot be updated")
        return self._write(lambda view: self._plan_update(view, name, fields, "update"))

    def set_status(self, name: str, status: Literal["ready", "failed"], reason: str | None = None) -> int:
        """Mark an expert ready or failed (the service does this when loading fails/recovers)."""
        fields = {"status": status, "status_reason": reason}
        return self._write(lambda view: self._plan_update(view, name, fields, "status"))

    def remove(self, name: str, force: bool = False) -> int:
        """Unregister an expert. If the category map names it: :class:`ExpertInUse`, unless
        ``force``, which also removes it from the map (and drops categories left empty)."""

        def plan(view: _View) -> _Plan:
            if not view.has(name):
                raise ExpertNotFound(f"no expert named {name!r} in namespace {self.namespace!r}")
            cmap = view.category_map()
            cats = [c for c, names in cmap.items() if name in names]
            p = _Plan(delete=[name])
            if cats:
                if not force:
                    raise ExpertInUse(
                        f"expert {name!r} is named by the category map (categories: {', '.join(cats)}); "
                        "change the map first or use --force"
                    )
                new_map = {c: [n for n in ns if n != name] for c, ns in cmap.items()}
                p.new_map = {c: ns for c, ns in new_map.items() if ns}
                p.events.append(("map", None, cats))
            p.events.append(("remove", name, []))
            return p

        return self._write(plan)

    def set_map(self, category_map: Mapping[str, Iterable[str]]) -> int:
        """Replace the category map. Every named expert must exist (:class:`InvalidCategoryMap`)."""
        new = parse_category_map({c: list(ns) for c, ns in category_map.items()})
        return self._write(lambda view: self._plan_map(view, new))

    def update_map(self, changes: Mapping[str, Iterable[str] | None]) -> int:
        """Set some categories, keep the others; a category given None or [] is removed."""
        shaped = parse_category_map({c: list(ns or []) for c, ns in changes.items()})

        def plan(view: _View) -> _Plan:
            new = dict(view.category_map())
            for cat, names in shaped.items():
                if names:
                    new[cat] = names
                else:
                    new.pop(cat, None)
            return self._plan_map(view, new)

        return self._write(plan)

    def import_experts(self, experts: Iterable[Expert | Mapping[str, Any]],
                       category_map: Mapping[str, Iterable[str]] | None = None,
                       overwrite: bool = False) -> int:
        """Add many experts (and optionally set the map) in ONE transaction: all or nothing.
        Experts keep their timestamps and status, so export -> import round-trips exactly.
        An existing name is :class:`ExpertExists` unless ``overwrite``."""
        items: list[Expert] = []
        for i, e in enumerate(experts):
            label = e.get("name", f"#{i + 1}") if isinstance(e, Mapping) else e.name
            items.append(parse_expert(dict(e) if isinstance(e, Mapping) else e, f"expert {label}"))
        names = [e.name for e in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ExpertExists(f"import lists expert(s) more than once: {', '.join(dup)}")
        new_map = None if category_map is None else parse_category_map(
            {c: list(ns) for c, ns in category_map.items()})

        def plan(view: _View) -> _Plan:
            existing = view.names()
            clash = sorted(set(names) & existing)
            if clash and not overwrite:
                raise ExpertExists(
                    f"expert(s) already exist in namespace {self.namespace!r}: {', '.join(clash)} "
                    "(use --overwrite to replace them)")
            p = _Plan(put={e.name: e for e in items},
                      events=[("update" if e.name in existing else "add", e.name, []) for e in items])
            if new_map is not None:
                mp = self._plan_map(view, new_map, known=existing | set(names))
                p.new_map, p.events = mp.new_map, p.events + mp.events
            return p

        return self._write(plan)

    @_redis_errors
    def purge(self) -> int:
        """Delete every key of this namespace (tests, decommissioning). Publishes nothing."""
        return int(self._r.delete(self.k_experts, self.k_map, self.k_version, self.k_categories))

    # ------------------------------------------------------------------ pub/sub

    def subscribe(self, reconnect: bool = True) -> Subscription:
        """A subscription to this namespace's events, already confirmed by Redis when returned
        (so any change made after this call is delivered). Iterate it, or call ``get(timeout)``."""
        return Subscription(self, reconnect=reconnect)

    async def asubscribe(self) -> AsyncSubscription:
        """The asyncio variant (redis.asyncio): ``async for event in await reg.asubscribe()``."""
        sub = AsyncSubscription(self)
        await sub.start()
        return sub

    def parse_event(self, data: str | bytes) -> RegistryEvent:
        return RegistryEvent.model_validate_json(data)

    # ------------------------------------------------------------------ internals

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return _redis_errors(lambda _self: fn(*args))(self)

    def _decode(self, name: str, raw: str) -> Expert:
        """One stored entry, validated: its schema, and that its key and its ``name`` agree (an
        entry stored under another key would be listed twice, and served under a name it is not)."""
        try:
            version = json.loads(raw).get("schema_version", 1)
        except (ValueError, AttributeError):
            version = 1
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise RegistryError(
                f"stored expert {name!r} in namespace {self.namespace!r} was written by a newer coe (entry schema "
                f"{version}, this coe reads up to {SCHEMA_VERSION}): upgrade coe to read or change it")
        try:
            expert = Expert.model_validate_json(raw)
        except ValidationError as err:
            raise RegistryError(
                f"stored expert {name!r} in namespace {self.namespace!r} is invalid: "
                + explain_validation_error(err, "stored")) from None
        if expert.name != name:
            raise RegistryError(f"stored expert {name!r} in namespace {self.namespace!r} is invalid: "
                                f"it is stored under {name!r} but names itself {expert.name!r}")
        return expert

    def _decode_all(self, raw: Mapping[str, str]) -> tuple[dict[str, Expert], dict[str, str]]:
        """Every entry of the hash: the readable ones (by name) and why the others are not. One
        malformed entry (a hand edit, a newer writer) must not hide the whole registry."""
        experts: dict[str, Expert] = {}
        invalid: dict[str, str] = {}
        for n in sorted(raw):
            try:
                experts[n] = self._decode(n, raw[n])
            except RegistryError as err:
                invalid[n] = str(err).splitlines()[0][:300]
        return experts, invalid

    def _decode_map(self, raw: str | None) -> CategoryMap:
        """The stored category map; a malformed one is skipped like a malformed expert (an empty
        map: every expert competes), with a warning, so one bad write cannot freeze every reader's
        view (issue 24); :meth:`map_error` says why, and ``coe-registry map set`` replaces it."""
        err = self.map_error(raw)
        if err is not None:
            log.warning("%s; routing without a category map until `coe-registry map set` replaces it", err)
            return {}
        return parse_category_map(json.loads(raw), "stored category map") if raw else {}

    def map_error(self, raw: str | None) -> str | None:
        """Why the stored category map ``raw`` cannot be read, or None."""
        if not raw:
            return None
        try:
            parse_category_map(json.loads(raw), "stored category map")
        except (ValueError, TypeError, RecursionError, RegistryError) as e:
            return f"stored category map in namespace {self.namespace!r} is invalid: {str(e).splitlines()[0][:300]}"
        return None

    def _plan_update(self, view: _View, name: str, fields: dict[str, Any], op: Op) -> _Plan:
        cur = view.expert(name)
        data = cur.model_dump()
        for key, value in fields.items():
            if key in ("generation", "capabilities", "engine_settings") and isinstance(value, Mapping) and isinstance(data.get(key), dict):
                merged = {**data[key], **value}
                data[key] = {k: v for k, v in merged.items() if v is not None} if key == "capabilities" else merged
            else:
                data[key] = value
        new = parse_expert(data, f"expert {name}")
        changed = [k for k in Expert.model_fields
                   if k not in ("updated_at", "schema_version") and getattr(new, k) != getattr(cur, k)]
        if not changed:
            return _Plan()
        new = new.model_copy(update={"updated_at": utcnow(), "schema_version": SCHEMA_VERSION})
        return _Plan(put={name: new}, events=[(op, name, ["status", "status_reason"] if op == "status" else changed)])

    def _plan_map(self, view: _View, new: CategoryMap, known: set[str] | None = None) -> _Plan:
        known = view.names() if known is None else known
        missing = [f"{n} (category {c})" for c, ns in new.items() for n in ns if n not in known]
        if missing:
            raise InvalidCategoryMap(f"category map names unknown expert(s): {', '.join(missing)}")
        old = view.category_map()
        changed = sorted(c for c in set(old) | set(new) if old.get(c) != new.get(c))
        if not changed and list(old) == list(new):
            return _Plan()
        return _Plan(new_map=new, events=[("map", None, changed)])

    @_redis_errors
    def _write(self, plan_fn: Callable[[_View], _Plan]) -> int:
        """Run ``plan_fn`` under WATCH and apply its plan atomically; retry on a lost race."""
        for attempt in range(_MAX_ATTEMPTS):
            with self._r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.k_version, self.k_experts, self.k_map)
                    version = int(pipe.get(self.k_version) or 0)
                    plan = plan_fn(_View(self, pipe))
                    if not plan.events:
                        pipe.unwatch()
                        return version
                    pipe.multi()
                    if plan.put:
                        pipe.hset(self.k_experts, mapping={n: e.model_dump_json() for n, e in plan.put.items()})
                    if plan.delete:
                        pipe.hdel(self.k_experts, *plan.delete)
                    if plan.new_map is not None:
                        if plan.new_map:
                            pipe.set(self.k_map, json.dumps(plan.new_map))
                        else:
                            pipe.delete(self.k_map)
                    now = utcnow()
                    for op, name, fields in plan.events:
                        version += 1
                        ev = RegistryEvent(version=version, op=op, name=name, fields=fields,
                                           namespace=self.namespace, ts=now)
                        pipe.publish(self.channel, ev.model_dump_json())
                    pipe.set(self.k_version, version)
                    pipe.execute()
                    return version
                except redis.WatchError:
                    time.sleep(random.uniform(0, min(0.05, 0.0005 * 2 ** min(attempt, 7))))
        raise RegistryBusy(f"gave up after {_MAX_ATTEMPTS} conflicting writes in namespace {self.namespace!r}")


class _View:
    """Reads made while WATCHing (immediate-mode pipeline), cached for one attempt."""

    def __init__(self, reg: RedisRegistry, pipe: redis.client.Pipeline):
        self._reg, self._pipe = reg, pipe
        self._map: CategoryMap | None = None
        self._names: set[str] | None = None

    def has(self, name: str) -> bool:
        return bool(self._pipe.hexists(self._reg.k_experts, name))

    def expert(self, name: str) -> Expert:
        raw = self._pipe.hget(self._reg.k_experts, name)
        if raw is None:
            raise ExpertNotFound(f"no expert named {name!r} in namespace {self._reg.namespace!r}")
        return self._reg._decode(name, raw)

    def names(self) -> set[str]:
        if self._names is None:
            self._names = set(self._pipe.hkeys(self._reg.k_experts))
        return self._names

    def category_map(self) -> CategoryMap:
        if self._map is None:
            self._map = self._reg._decode_map(self._pipe.get(self._reg.k_map))
        return self._map


class Subscription:
    """Synchronous event stream of one namespace. Use as an iterator (blocks; with
    ``reconnect=True`` it rides out Redis restarts, after which the consumer should compare
    versions and re-read the snapshot) or call :meth:`get` with a timeout. Close when done."""

    def __init__(self, reg: RedisRegistry, reconnect: bool = True):
        self._reg, self._reconnect, self._closed = reg, reconnect, False
        self._pubsub = reg._r.pubsub()
        reg._call(self._subscribe)

    def _subscribe(self) -> None:
        self._pubsub.subscribe(self._reg.channel)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until Redis confirms the subscription
            msg = self._pubsub.get_message(timeout=1.0)
            if msg and msg.get("type") == "subscribe":
                return
        raise RedisUnavailable(f"Redis at {mask_url(self._reg.url)} did not confirm the subscription")

    def get(self, timeout: float | None = 1.0) -> RegistryEvent | None:
        """The next event, or None if none arrives within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = self._reg._call(self._pubsub.get_message, False, left)
            except Exception:
                if self._closed:  # close() from another thread broke the connection under us
                    return None
                raise
            if msg and msg.get("type") == "message":
                return self._reg.parse_event(msg["data"])
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return None

    def __iter__(self) -> Iterator[RegistryEvent]:
        backoff = 0.1
        while not self._closed:
            try:
                ev = self.get(timeout=1.0)
                backoff = 0.1
            except RedisUnavailable:
                if not self._reconnect or self._closed:
                    raise
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if ev is not None:
                yield ev

    def close(self) -> None:
        self._closed = True
        try:
            self._pubsub.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not raise
            pass

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSubscription:
    """asyncio event stream (redis.asyncio); from :meth:`RedisRegistry.asubscribe`."""

    def __init__(self, reg: RedisRegistry):
        import redis.asyncio as aredis

        self._reg = reg
        self._client = aredis.Redis.from_url(reg.url, decode_responses=True)
        self._pubsub = self._client.pubsub()

    async def start(self) -> None:
        try:
            await self._pubsub.subscribe(self._reg.channel)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                msg = await self._pubsub.get_message(timeout=1.0)
                if msg and msg.get("type") == "subscribe":
                    return
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            raise RedisUnavailable(f"cannot reach Redis at {mask_url(self._reg.url)}: {err}") from None
        raise RedisUnavailable(f"Redis at {mask_url(self._reg.url)} did not confirm the subscription")

    async def get(self, timeout: float | None = 1.0) -> RegistryEvent | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = await self._pubsub.get_message(timeout=left)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
                raise RedisUnavailable(f"cannot reach Redis at {mask_url(self._reg.url)}: {err}") from None
            if msg and msg.get("type") == "message":
                return self._reg.parse_event(msg["data"])
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> RegistryEvent:
        while True:
            ev = await self.get(timeout=None)
            if ev is not None:
                return ev

    async def aclose(self) -> None:
        try:
            await self._pubsub.aclose()
            await self._client.aclose()
        except Exception:  # noqa: BLE001
            pass

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
