"""RedisRegistry against a real Redis: CRUD, category map, versions, events, namespaces."""

from __future__ import annotations

import asyncio

import pytest

from expert_registry.errors import (
    ExpertExists,
    ExpertInUse,
    ExpertNotFound,
    InvalidCategoryMap,
    InvalidExpert,
    RedisUnavailable,
)
from expert_registry.spec import Expert
from expert_registry.store import RedisRegistry


def mk(name: str, **kw) -> Expert:
    return Expert(name=name, model=f"/models/{name}.gguf", **kw)


def drain(sub, n: int, timeout: float = 5.0):
    events = []
    while len(events) < n:
        ev = sub.get(timeout=timeout)
        if ev is None:
            break
        events.append(ev)
    return events


def test_crud_map_versions_and_events(registry):
    with registry.subscribe() as sub:
        assert registry.add(mk("a", capabilities={"coding": 0.9})) == 1
        assert registry.add(mk("b")) == 2
        assert [e.name for e in registry.list()] == ["a", "b"]
        assert registry.set_map({"coding": ["a", "b"], "general": ["b"]}) == 3
        assert registry.update("a", generation={"temperature": 0.1}, capabilities={"math": 0.5}) == 4
        a = registry.get("a")
        assert a.generation.temperature == 0.1 and a.generation.max_tokens == 256  # merged
        assert a.capabilities == {"coding": 0.9, "math": 0.5}
        assert a.updated_at > a.created_at
        assert registry.update("a", generation={"temperature": 0.1}) == 4  # no change: no event
        assert registry.set_status("a", "failed", "CUDA OOM") == 5
        assert registry.get("a").status == "failed"
        with pytest.raises(ExpertInUse, match="coding"):
            registry.remove("a")
        assert registry.remove("a", force=True) == 7  # map change + remove
        events = drain(sub, 7)
    assert [(e.version, e.op, e.name) for e in events] == [
        (1, "add", "a"), (2, "add", "b"), (3, "map", None), (4, "update", "a"),
        (5, "status", "a"), (6, "map", None), (7, "remove", "a")]
    assert events[3].fields == ["generation", "capabilities"]
    assert events[5].fields == ["coding"]
    assert all(e.namespace == registry.namespace for e in events)
    snap = registry.snapshot()
    assert snap.version == registry.version() == 7
    assert list(snap.experts) == ["b"]
    assert snap.category_map == {"coding": ["b"], "general": ["b"]}


def test_refusals_change_nothing(registry):
    registry.add(mk("a"))
    registry.set_map({"general": ["a"]})
    before = registry.snapshot()
    with pytest.raises(ExpertExists):
        registry.add(mk("a"))
    with pytest.raises(ExpertNotFound):
        registry.get("zz")
    with pytest.raises(ExpertNotFound):
        registry.remove("zz")
    with pytest.raises(InvalidCategoryMap, match="zz"):
        registry.set_map({"general": ["a", "zz"]})
    with pytest.raises(InvalidExpert, match="capabilities"):
        registry.update("a", capabilities={"coding": 2.0})
    with pytest.raises(InvalidExpert, match="unknown field 'colour'"):
        registry.update("a", colour="red")
    with pytest.raises(InvalidExpert):
        registry.update("a", name="b")
    with pytest.raises(ExpertExists):  # import is all or nothing
        registry.import_experts([mk("new1"), mk("a"), mk("new2")])
    with pytest.raises(InvalidCategoryMap):
        registry.import_experts([mk("new1")], {"general": ["nobody"]})
    assert registry.snapshot() == before


def test_export_import_round_trip(registry, redis_url):
    registry.add(mk("a", capabilities={"coding": 0.8}, tags=["x"], system_prompt="be brief"))
    registry.add(mk("b", engine="hf", dtype="float32"))
    registry.set_status("b", "failed", "bad weights")
    registry.set_map({"coding": ["a", "b"]})
    exported = registry.export()
    other = RedisRegistry(redis_url, registry.namespace + "-copy")
    try:
        other.import_experts(exported["experts"], exported["category_map"])
        again = other.export()
        assert again["experts"] == exported["experts"]
        assert again["category_map"] == exported["category_map"]
        assert other.snapshot().experts == registry.snapshot().experts
    finally:
        other.purge()


def test_namespaces_are_isolated(registry, redis_url):
    other = RedisRegistry(redis_url, registry.namespace + "-b")
    try:
        with other.subscribe() as sub_other:
            registry.add(mk("a"))
            registry.set_map({"general": ["a"]})
            assert other.list() == [] and other.get_map() == {} and other.version() == 0
            assert sub_other.get(timeout=0.3) is None
            other.add(mk("a", engine="vllm"))  # same name, other namespace: fine
            assert registry.get("a").engine == "auto" and other.get("a").engine == "vllm"
            assert sub_other.get(timeout=2).version == 1
    finally:
        other.purge()


async def test_async_subscribe(registry):
    sub = await registry.asubscribe()
    async with sub:
        await asyncio.to_thread(registry.add, mk("a"))
        await asyncio.to_thread(registry.set_map, {"math": ["a"]})
        first = await asyncio.wait_for(sub.__anext__(), 5)
        second = await sub.get(timeout=5)
    assert (first.op, first.name, first.version) == ("add", "a", 1)
    assert (second.op, second.version) == ("map", 2)


def test_unreachable_redis_names_url():
    reg = RedisRegistry("redis://:secret@127.0.0.1:1/0", "x")
    with pytest.raises(RedisUnavailable, match=r"redis://:\*\*\*@127.0.0.1:1/0") as err:
        reg.list()
    assert "secret" not in str(err.value)
