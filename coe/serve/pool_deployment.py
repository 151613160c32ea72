"""``ExpertPoolDeployment``: a thin Ray Serve shell over one plain :class:`coe.pool.ExpertPool`.

One replica per GPU (or CPU replicas). Requests arrive with ``multiplexed_model_id=<expert>``;
Ray Serve's multiplexed routing sends them to a replica that already holds that expert (any tier),
so the pool's tier manager, not a home-made dispatcher, decides what sits in HBM. The multiplexed
"model" object is only a ticket for the expert in this replica's pool; when Serve evicts it (more
than ``COE_MAX_EXPERTS_PER_REPLICA`` experts asked of this replica) the expert leaves the pool.

Responses are plain dicts (cheap to pickle, no FastAPI below the ingress): a stream starts with
``{"type": "start", "prompt_tokens": n}`` or a single ``{"type": "error", ...}`` and continues
with ``{"type": "chunk", ...}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, AsyncIterator

from ray import serve

from coe.config import ServeConfig

log = logging.getLogger("coe.serve.pool")

MAX_EXPERTS_PER_REPLICA = int(os.environ.get("COE_MAX_EXPERTS_PER_REPLICA", "16"))
STATS_EVERY_S = 2.0
STATS_TTL_S = 15


def _err(status: int, message: str, param: str | None = None, code: str | None = None,
         etype: str | None = None, retry_after: int | None = None) -> dict:
    return {"type": "error", "status": status, "message": message, "param": param, "code": code,
            "error_type": etype or ("invalid_request_error" if status < 500 else "server_error"),
            "retry_after": retry_after}


class _ExpertTicket:
    """What ``@serve.multiplexed`` caches per expert; evicting it removes the expert from the pool."""

    def __init__(self, owner: "ExpertPoolDeployment", name: str):
        self.owner = owner
        self.name = name

    async def __del__(self):  # called by Serve's multiplexer on LRU eviction (awaited there)
        await self.owner._drop(self.name)


@serve.deployment(name="ExpertPool")
class ExpertPoolDeployment:
    async def __init__(self, config: dict):
        from coe.pool import ExpertPool

        self.cfg = ServeConfig.model_validate(config)
        pc = self.cfg.pool
        self.device = pc.resolved_device()
        self.pool = ExpertPool(pc.pool_config())
        self._watcher = None
        self._started = asyncio.Lock()
        self._add_locks: dict[str, asyncio.Lock] = {}
        self._replica = _replica_tag()
        self._redis = None
        self._ray_gauges = _pool_gauges()
        self._stats_task: asyncio.Task | None = None
        self._swaps_seen: dict[str, tuple[int, float]] = {}
        from coe.limits import LatencyEWMA

        self._latency = LatencyEWMA()  # typical request time, for Retry-After on a full queue
        await self._ensure_started()  # registry watch + stats publishing from the start

    # ---- lifecycle ---------------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._watcher is not None:
            return
        async with self._started:
            if self._watcher is not None:
                return
            import redis

            from coe.serve.registry_watch import RegistryWatcher

            w = RegistryWatcher(self.cfg.redis_url, self.cfg.namespace, self.cfg.registry_poll_s,
                                on_change=self._on_registry_change)
            await w.start()
            self._redis = redis.Redis.from_url(self.cfg.redis_url, socket_timeout=2, socket_connect_timeout=2)
            self._watcher = w
            self._stats_task = asyncio.create_task(self._publish_stats())

    async def _on_registry_change(self, old: Any, new: Any) -> None:
        """Removed experts leave the pool (in-flight requests finish first, inside remove_expert);
        a changed spec is re-read on the next request."""
        from coe.serve.registry_watch import diff_snapshots

        d = diff_snapshots(old, new)
        # an expert marked ready again after a failure (files fixed): drop the failed engine, so the
        # next request builds a fresh one instead of repeating the old error
        revived = [n for n, e in new.experts.items() if old is not None and n in old.experts
                   and old.experts[n].status == "failed" and e.status == "ready"]
        for name in d.removed + d.updated + revived:
            if name in self.pool.experts():
                why = "removed" if name in d.removed else "updated" if name in d.updated else "marked ready again"
                log.info("registry %s %s: leaving pool", why, name)
                asyncio.create_task(self._drop(name))

    async def _drop(self, name: str) -> None:
        try:
            if name in self.pool.experts():
                await self.pool.remove_expert(name)
        except Exception as e:
            log.warning("removing %s from pool failed: %s", name, e)

    async def check_health(self) -> None:  # Serve calls this periodically
        return None

    # ---- multiplexing ------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MAX_EXPERTS_PER_REPLICA)
    async def _ticket(self, name: str) -> _ExpertTicket:
        return _ExpertTicket(self, name)

    async def _ensure_expert(self, name: str) -> dict | None:
        """Add the expert to this replica's pool from its registry spec; an error dict if it can't be."""
        from coe import errors as ce

        await self._ticket(name)
        if name in self.pool.experts():
            return None
        lock = self._add_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.pool.experts():
                return None
            snap = self._watcher.snapshot
            spec = snap.experts.get(name) if snap is not None else None
            if spec is None:
                await self._watcher.refresh()
                spec = self._watcher.snapshot.experts.get(name)
            if spec is None:
                return _err(404, f"expert '{name}' is not registered (removed?)", "model", "model_not_found")
            try:
                await self.pool.add_expert(spec)
            except ce.ExpertTooLarge as e:
                return _err(503, str(e), "model", "expert_too_large")
            except ce.ExpertExistsInPool:
                return None
            except ce.ExpertLoadError as e:
                await self._mark_failed(name, e.reason)
                return _err(503, str(e), "model", "expert_load_failed")
            except Exception as e:  # a broken spec must not take the replica down
                await self._mark_failed(name, f"{type(e).__name__}: {e}")
                return _err(503, f"expert '{name}' could not be loaded: {e}", "model", "expert_load_failed")
        return None

    async def _mark_failed(self, name: str, reason: str) -> None:
        try:
            await asyncio.to_thread(self._watcher.registry.set_status, name, "failed", reason)
        except Exception as e:
            log.warning("could not mark %s failed in the registry: %s", name, e)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream one chat completion from the expert named by the multiplexed model id."""
        from coe import errors as ce
        from coe.engines.base import SamplingParams

        name = serve.get_multiplexed_model_id()
        await self._ensure_started()
        err = await self._ensure_expert(name)
        if err:
            yield err
            return
        spec = self._watcher.snapshot.experts.get(name)
        messages = request["messages"]
        gen = spec.generation if spec is not None else None
        max_tokens = request.get("max_tokens") or (gen.max_tokens if gen else 256)
        try:
            prompt_tokens = await asyncio.to_thread(self.pool.count_prompt_tokens, name, messages)
        except ce.ExpertLoadError as e:
            await self._mark_failed(name, e.reason)
            yield _err(503, str(e), "model", "expert_load_failed")
            return
        except ce.ExpertNotServed as e:
            yield _err(404, f"expert '{name}' is being removed: {e}", "model", "model_not_found")
            return
        except Exception as e:  # tokenizer files missing/corrupt: the expert cannot be served
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            await self._mark_failed(name, reason)
            yield _err(503, f"expert '{name}' could not be loaded: {reason}", "model", "expert_load_failed")
            return
        max_context = spec.max_context if spec is not None else None
        if max_context is not None:
            if prompt_tokens >= max_context:
                yield _err(400, f"the prompt is {prompt_tokens} tokens; expert '{name}' has a context of "
                                f"{max_context} tokens", "messages", "context_length_exceeded")
                return
            if request.get("max_tokens_explicit") and prompt_tokens + max_tokens > max_context:
                yield _err(400, f"max_tokens={max_tokens} plus the prompt's {prompt_tokens} tokens exceeds "
                                f"expert '{name}''s context of {max_context} tokens; use at most "
                                f"{max_context - prompt_tokens}", "max_tokens", "context_length_exceeded")
                return
            max_tokens = min(max_tokens, max_context - prompt_tokens)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=request["temperature"] if request.get("temperature") is not None
            else (gen.temperature if gen else 0.7),
            top_p=request["top_p"] if request.get("top_p") is not None else (gen.top_p if gen else 1.0),
            stop=request.get("stop") if request.get("stop") is not None else (list(gen.stop) if gen else []),
            seed=request.get("seed"),
        )
        yield {"type": "start", "prompt_tokens": prompt_tokens, "max_tokens": max_tokens}
        t0 = time.monotonic()
        try:
            async for chunk in self.pool.generate(name, messages, params):
                yield {"type": "chunk", "text": chunk.text, "finish_reason": chunk.finish_reason,
                       "prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens}
                if chunk.finish_reason is not None:
                    self._latency.observe(time.monotonic() - t0)
        except ce.QueueFull as e:
            from coe.limits import retry_after_s

            st = self.pool.state().get(name)
            wait = retry_after_s(st.queue_depth if st else 0, self.pool.config.max_batch_size, self._latency.value,
                                 self.cfg.limits.retry_after_min_s, self.cfg.limits.retry_after_max_s)
            yield _err(429, f"{e}; retry in {wait} s", None, "queue_full", "rate_limit_error", wait)
        except ce.ExpertNotServed as e:
            yield _err(404, f"expert '{name}' was removed: {e}", "model", "model_not_found")
        except ce.ExpertLoadError as e:
            await self._mark_failed(name, e.reason)
            yield _err(503, str(e), "model", "expert_load_failed")

    async def sync(self, demand: dict[str, int] | None = None) -> dict[str, float]:
        """Router -> pool: recent demand per expert (prefetch hint); pool -> router: residency."""
        await self._ensure_started()
        if demand:
            try:
                self.pool.hint_demand(demand)
            except Exception as e:
                log.debug("hint_demand failed: %s", e)
        return dict(self.pool.residency_hint())

    async def stats(self) -> dict:
        """This replica's snapshot (the same dict it publishes to Redis for ``/metrics``)."""
        from coe.metrics import pool_snapshot

        await self._ensure_started()
        return pool_snapshot(self._replica, self.pool.state(), self.pool.metrics())

    async def _publish_stats(self) -> None:
        from coe.metrics import pool_snapshot

        key = f"coe:{self.cfg.namespace}:poolstats:{self._replica}"
        while True:
            try:
                snap = pool_snapshot(self._replica, self.pool.state(), self.pool.metrics())
                await asyncio.to_thread(self._redis.set, key, json.dumps(snap), ex=STATS_TTL_S)
                _set_pool_gauges(self._ray_gauges, snap, self._swaps_seen)
            except Exception as e:
                log.debug("publishing pool stats failed: %s", e)
            await asyncio.sleep(STATS_EVERY_S)

    def __del__(self):
        if self._stats_task:
            self._stats_task.cancel()


def _replica_tag() -> str:
    try:
        ctx = serve.get_replica_context()
        return ctx.replica_tag if hasattr(ctx, "replica_tag") else str(ctx.replica_id.unique_id)
    except Exception:
        return f"pid{os.getpid()}"


def _pool_gauges() -> dict | None:
    try:
        from ray.serve import metrics as rm

        return {
            "queue": rm.Gauge("coe_queue_depth", "Requests waiting per expert", tag_keys=("expert",)),
            "tier": rm.Gauge("coe_expert_resident", "1 when the expert is in this tier", tag_keys=("expert", "tier")),
            "tier_bytes": rm.Gauge("coe_tier_bytes", "Bytes of expert weights held per tier", tag_keys=("tier",)),
            "tier_budget": rm.Gauge("coe_tier_budget_bytes", "Tier budget, bytes", tag_keys=("tier",)),
            "swaps": rm.Gauge("coe_swaps", "Tier moves so far (src->dst)", tag_keys=("src", "dst")),
            "swap_seconds": rm.Gauge("coe_swap_seconds", "Seconds spent moving weights so far", tag_keys=("src", "dst")),
            "swap_latency": rm.Histogram("coe_swap_latency_seconds", "Duration of each tier move",
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                                         tag_keys=("src", "dst")),
        }
    except Exception:
        return None


def _set_pool_gauges(g: dict | None, snap: dict, seen: dict) -> None:
    """Ray metrics from one pool snapshot. Swap latency: the moves of each src->dst since the
    last snapshot are observed at their mean duration (Δ swap seconds / Δ swaps), so the
    histogram's sum and count are exact; a single move per period (the usual case) is exact."""
    if not g:
        return
    m = snap["metrics"]
    for name, e in snap["experts"].items():
        g["queue"].set(e["queue_depth"], tags={"expert": name})
        for tier in ("hbm", "dram", "disk"):
            g["tier"].set(1 if e["tier"] == tier else 0, tags={"expert": name, "tier": tier})
    for t, v in (m.get("bytes") or {}).items():
        g["tier_bytes"].set(v, tags={"tier": t})
    for t, v in (m.get("budget_bytes") or {}).items():
        g["tier_budget"].set(v, tags={"tier": t})
    for k, n in (m.get("swaps") or {}).items():
        src, _, dst = k.partition("->")
        tags = {"src": src, "dst": dst}
        secs = float((m.get("swap_seconds") or {}).get(k, 0.0))
        g["swaps"].set(n, tags=tags)
        g["swap_seconds"].set(secs, tags=tags)
        n0, s0 = seen.get(k, (0, 0.0))
        if n > n0:
            mean = max(secs - s0, 0.0) / (n - n0)
            for _ in range(min(n - n0, 100)):
                g["swap_latency"].observe(mean, tags=tags)
        seen[k] = (n, secs)

