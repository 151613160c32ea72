"""API keys and per-key limits in the registry's Redis (real redis-server of the session)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import redis

from coe.keys import KeyLimits, KeyRing, KeyStoreUnavailable, RedisKeyStore, allowed_experts, key_hash
from coe.tenant_limits import LimitExceeded, TenantLimiter, estimate_tokens

DEAD = "redis://127.0.0.1:9/0"


@pytest.fixture
def store(redis_url):
    s = RedisKeyStore(redis_url, f"keys-{uuid.uuid4().hex[:8]}")
    yield s
    keys = list(s.r.scan_iter(f"coe:{s.namespace}:*"))
    if keys:
        s.r.delete(*keys)


def test_keys_are_stored_hashed_and_every_replica_sees_one_set(store):
    key, rec = store.add("alice", limits=KeyLimits(rpm=10))
    raw = store.r.hgetall(store.hkey)
    assert key not in str(raw) and key_hash(key) in str(raw)  # only the hash is in Redis
    with pytest.raises(ValueError, match="already exists"):
        store.add("alice")
    a, b = KeyRing(store, env={}), KeyRing(store, env={}, refresh_s=0)  # two replicas
    assert a.check(key).name == b.check(key).name == "alice"
    assert a.check(key).limits.rpm == 10 and a.check("coe-wrong") is None
    store.set_limits("alice", tpm=500, experts=["tiny-a"])
    store.remove("alice")
    assert b.check(key) is None  # revoked: seen on the next check


def test_last_good_set_is_kept_and_the_ring_fails_closed(store):
    key, _ = store.add("bob")
    ring = KeyRing(store, env={}, refresh_s=0)
    assert ring.check(key) is not None
    good, store.r = store.r, redis.Redis.from_url(DEAD, socket_timeout=0.5, socket_connect_timeout=0.5,
                                                  decode_responses=True)
    try:
        assert ring.check(key) is not None and ring.configured  # store unreadable: keeps the last good set
        assert ring.health()["store"] == "unreadable" and "last good set of 1" in ring.health()["detail"]
        assert ring.check("coe-someone-else") is None
    finally:
        store.r = good
    assert ring.check(key) is not None and ring.health()["store"] == "ok"
    never = KeyRing(RedisKeyStore(DEAD, "x", socket_timeout=0.5), env={})
    assert never.configured  # unknown counts as "keys on"
    with pytest.raises(KeyStoreUnavailable):
        never.check(key)
    assert never.verify(key) is None


def test_env_keys_have_no_limits(store):
    ring = KeyRing(store, env={"COE_API_KEYS": "k-one", "COE_ADMIN_KEYS": "k-admin"})
    assert ring.check("k-one").role == "user" and ring.check("k-admin").role == "admin"
    assert ring.check("k-one").limits == KeyLimits()


def test_rpm_tpm_and_budget_refuse_with_retry_after(store):
    clock = [1_000_040.0]  # 20 s into a minute (16667 * 60 = 1_000_020)
    lim = TenantLimiter(store.r, store.namespace, clock=lambda: clock[0])
    _, rec = store.add("carol", limits=KeyLimits(rpm=2, tpm=1000, token_budget=1000, budget_period="hour"))
    lim.admit(rec, 10).settle(10)
    lim.admit(rec, 10).settle(10)
    with pytest.raises(LimitExceeded) as e:
        lim.admit(rec, 10)
    assert e.value.limit == "rpm" and e.value.retry_after_s == 40
    clock[0] += 60  # next minute
    t = lim.admit(rec, 900)  # reserves the estimate
    with pytest.raises(LimitExceeded) as e:
        lim.admit(rec, 200)
    assert e.value.limit == "tpm"
    t.settle(100)  # the true count was smaller: the difference comes back
    lim.admit(rec, 200).settle(200)
    assert lim.usage(rec)["tokens_this_minute"] == 300
    clock[0] += 60
    with pytest.raises(LimitExceeded) as e:  # 10 + 10 + 100 + 200 used; 1000 per hour
        lim.admit(rec, 700)
    assert e.value.limit == "budget" and 0 < e.value.retry_after_s <= 3600
    assert estimate_tokens(100, 50, n=2) == 200


def test_permissions_from_experts_and_categories():
    m = {"math": ["b"], "general": ["a"]}
    assert allowed_experts(KeyLimits(), m) is None
    assert allowed_experts(KeyLimits(categories=["math"]), m) == {"b"}
    assert allowed_experts(KeyLimits(experts=["a"], categories=["math"]), m) == {"a", "b"}


def test_coe_keys_cli_writes_redis(store, redis_url):
    env = {**os.environ, "COE_REDIS_URL": redis_url, "COE_NAMESPACE": store.namespace, "COLUMNS": "200"}

    def coe(*args):
        return subprocess.run([sys.executable, "-m", "coe.cli", "keys", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    out = coe("add", "team-a", "--rpm", "30", "--tpm", "20000", "--budget", "1000000", "--period", "day",
              "--categories", "math,coding")
    assert out.returncode == 0, out.stderr
    key = [ln for ln in out.stdout.splitlines() if ln.startswith("coe-")][0]
    rec = KeyRing(store, env={}).check(key)
    assert (rec.limits.rpm, rec.limits.tpm, rec.limits.token_budget, rec.limits.budget_period,
            rec.limits.categories) == (30, 20000, 1000000, "day", ["math", "coding"])
    assert coe("limits", "team-a", "--rpm", "0").returncode == 0
    assert KeyRing(store, env={}).check(key).limits.rpm is None
    assert KeyRing(store, env={}).check(key).limits.feedback  # may score its answers unless told not to
    assert coe("limits", "team-a", "--no-feedback").returncode == 0
    assert not KeyRing(store, env={}).check(key).limits.feedback
    listed = coe("list", "--json")
    assert '"team-a"' in listed.stdout and key not in listed.stdout
    assert coe("limits", "team-a", "--period", "fortnight").returncode == 2  # one-line error
    assert coe("remove", "team-a").returncode == 0
    assert KeyRing(store, env={}).check(key) is None
