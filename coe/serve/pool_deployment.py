"""``ExpertPoolDeployment``: a thin Ray Serve shell over one plain :class:`coe.pool.ExpertPool`.

One replica per node (DESIGN decision 1). Requests arrive with ``multiplexed_model_id=<expert>``;
Serve's request router (``coe.serve.pool_routing``, fed by ``record_routing_stats``) sends them to
the replica that holds that expert hot, else one that holds it in any tier, else the least loaded,
so the pool's tier manager, not a home-made dispatcher, decides what sits in HBM. The multiplexed
"model" object is only a ticket for the expert in this replica's pool; when Serve evicts it (more
than ``pool.max_experts_per_replica`` experts asked of this replica) the expert leaves the pool.

Responses are plain dicts (cheap to pickle, no FastAPI below the ingress): a stream starts with
``{"type": "start", "prompt_tokens": n, "replica": id, "node": id}`` or a single
``{"type": "error", "error": report}`` and continues with ``{"type": "chunk", ...}``. ``report`` is a
:class:`coe.errors.ErrorReport` (as a dict): the kind of error of decision 2 and its code, no HTTP
status; the ingress maps it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator

from ray import serve

from coe.config import ServeConfig
from coe.errors import ErrorKind, ErrorReport
from coe.generate_request import GenerateRequest

log = logging.getLogger("coe.serve.pool")

GAUGES_EVERY_S = 2.0  # tier / queue gauges are set in-process this often (nothing is written to Redis)


def _err(kind: ErrorKind, code: str, message: str, param: str | None = "model",
         retry_after_s: float | None = None) -> dict:
    """An error item of the stream: the typed report (decision 2), never an HTTP status."""
    report = ErrorReport(kind=kind, code=code, message=message, param=param, retry_after_s=retry_after_s)
    return {"type": "error", "error": report.model_dump(mode="json")}


def _load_failed(message: str) -> dict:
    """A permanent expert error: the expert is marked failed; the ingress tries the next-best."""
    return _err(ErrorKind.PERMANENT, "expert_load_failed", message)


def _transient(e: Any) -> dict:
    """A transient expert error (decision 2): the ingress sends the request to the next-best expert."""
    return _err(ErrorKind.TRANSIENT, "expert_unavailable", str(e), retry_after_s=e.retry_after_s)


def _context_error(name: str, prompt_tokens: int, max_tokens: int, max_context: int, explicit: bool) -> dict | None:
    """A request error when the prompt, or the prompt plus a ``max_tokens`` the client set, does not
    fit the expert's context window (a default ``max_tokens`` is cut to fit instead)."""
    if prompt_tokens >= max_context:
        return _err(ErrorKind.REQUEST, "context_length_exceeded", f"the prompt is {prompt_tokens} tokens; "
                    f"expert '{name}' has a context of {max_context} tokens", "messages")
    if explicit and prompt_tokens + max_tokens > max_context:
        return _err(ErrorKind.REQUEST, "context_length_exceeded",
                    f"max_tokens={max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the context of "
                    f"expert '{name}' ({max_context} tokens); use at most {max_context - prompt_tokens}",
                    "max_tokens")
    return None


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
        self._node = _node_id()
        self._ray_gauges = _pool_gauges()
        self._gauge_task: asyncio.Task | None = None
        if self._ray_gauges:  # each move observed where it happens, per expert and per src->dst
            self.pool.tiers.metrics.observers.append(lambda name, rec: _observe_swap(self._ray_gauges, name, rec))

        async def load_ticket(name: str) -> _ExpertTicket:  # a plain function: Serve caches its wrapper on it
            return _ExpertTicket(self, name)

        # Serve's multiplexer, sized from the typed config (not an environment variable)
        self._ticket = serve.multiplexed(max_num_models_per_replica=pc.max_experts_per_replica)(load_ticket)
        from coe.limits import LatencyEWMA

        self._latency = LatencyEWMA()  # typical request time, for Retry-After on a full queue
        if self.device.startswith("cuda"):  # before requests: the first engine start must not import vLLM
            from coe.engines.vllm_engine import preload_vllm

            try:
                await asyncio.to_thread(preload_vllm)
            except Exception as e:  # noqa: BLE001 - a broken vLLM fails its experts' starts, not the replica
                log.warning("vLLM could not be imported ahead of the first start: %s", e)
        await self._ensure_started()  # registry watch + stats publishing from the start

    # ---- lifecycle ---------------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._watcher is not None:
            return
        async with self._started:
            if self._watcher is not None:
                return
            from coe.serve.registry_watch import RegistryWatcher

            w = RegistryWatcher(self.cfg.redis_url, self.cfg.namespace, self.cfg.registry_poll_s,
                                on_change=self._on_registry_change)
            await w.start()
            self._watcher = w
            self._gauge_task = asyncio.create_task(self._set_gauges())

    async def _on_registry_change(self, old: Any, new: Any) -> None:
        """Removed experts leave the pool (in-flight requests finish first, inside remove_expert);
        a changed spec is re-read on the next request."""
        from coe.serve.registry_watch import diff_snapshots

        d = diff_snapshots(old, new)
        for name in d.added:  # start the engine now, so the first request does not pay for it
            spec = new.experts.get(name)
            if spec is not None and spec.status == "ready" and self.pool.config.start_on_add:
                asyncio.create_task(self._start_added(name))
        # an expert marked ready again after a failure (files fixed): drop the failed engine, so the
        # next request builds a fresh one instead of repeating the old error
        revived = [n for n, e in new.experts.items() if old is not None and n in old.experts
                   and old.experts[n].status == "failed" and e.status == "ready"]
        for name in d.removed + d.updated + revived:
            if name in self.pool.experts():
                why = "removed" if name in d.removed else "updated" if name in d.updated else "marked ready again"
                log.info("registry %s %s: leaving pool", why, name)
                asyncio.create_task(self._drop(name))

    async def _start_added(self, name: str) -> None:
        """Put a newly registered expert into this replica's pool; the pool starts its engine in
        the background (``loading`` with its phase in ``/v1/models``, then ``ready``)."""
        from coe import errors as ce

        try:
            await self._ticket(name)
            err = await self._ensure_expert(name)
            if err:
                log.info("starting %s: %s", name, err["error"]["message"])
                return
            while self.pool.config.start_on_add and name in self.pool.experts():
                try:  # a start that fails for good marks the entry failed now, not at the first request
                    await self.pool.wait_started(name, 3600.0)
                    return
                except ce.ExpertLoadError as e:
                    await self._mark_failed(name, e.reason)
                    return
                except ce.ExpertTransientError as e:  # retried inside the pool; watch the next attempt
                    await asyncio.sleep(max(0.5, e.retry_after_s))
                except (ce.ExpertNotServed, ce.ExpertStarting):
                    return
        except Exception as e:  # noqa: BLE001 - the first request retries and reports
            log.warning("starting %s in the background failed: %s", name, e)

    async def _drop(self, name: str) -> None:
        try:
            if name in self.pool.experts():
                await self.pool.remove_expert(name)
        except Exception as e:
            log.warning("removing %s from pool failed: %s", name, e)

    async def check_health(self) -> None:  # Serve calls this periodically
        return None

    # ---- multiplexing ------------------------------------------------------------------------
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
                return _err(ErrorKind.REQUEST, "model_not_found", f"expert '{name}' is not registered (removed?)")
            if spec.trust_remote_code and not self.cfg.security.allow_remote_code:
                # writing the registry must not be enough to run code in this process (issue 12)
                reason = ("its entry sets trust_remote_code, and this service does not allow remote code "
                          "(security.allow_remote_code)")
                await self._mark_failed(name, reason)
                return _load_failed(f"expert '{name}' could not be loaded: {reason}")
            try:
                await self.pool.add_expert(spec)
            except ce.ExpertTooLarge as e:
                return _err(ErrorKind.PERMANENT, "expert_too_large", str(e))
            except ce.ExpertExistsInPool:
                return None
            except ce.ExpertLoadError as e:
                await self._mark_failed(name, e.reason)
                return _load_failed(str(e))
            except ce.ExpertTransientError as e:
                return _transient(e)
            except Exception as e:  # a broken spec must not take the replica down
                await self._mark_failed(name, f"{type(e).__name__}: {e}")
                return _load_failed(f"expert '{name}' could not be loaded: {e}")
        return None

    async def _until_started(self, name: str, wait_s: float | None) -> dict | None:
        """An expert whose engine is still starting after its add: wait for it (up to ``wait_s``,
        default ``limits.loading_wait_s``); an error item when the wait runs out (transient
        ``expert_loading`` with its retry time) or the start fails meanwhile (the start's own error)."""
        from coe import errors as ce

        try:
            if not self.pool.starting(name):
                return None
            await self.pool.wait_started(name, self.cfg.limits.loading_wait_s if wait_s is None else wait_s)
        except ce.ExpertStarting as e:
            return _err(ErrorKind.TRANSIENT, "expert_loading", str(e), retry_after_s=e.retry_after_s)
        except ce.ExpertLoadError as e:
            await self._mark_failed(name, e.reason)
            return _load_failed(str(e))
        except ce.ExpertTransientError as e:
            return _transient(e)
        except ce.ExpertNotServed as e:
            return _err(ErrorKind.REQUEST, "model_not_found", f"expert '{name}' was removed: {e}")
        return None

    async def _prompt_tokens(self, name: str, messages: Any) -> int | dict:
        """The prompt's length in the expert's tokens, or the error item when it cannot be counted:
        the request's own fault (registry untouched), or the expert's (tokenizer files missing or
        corrupt: marked failed)."""
        from coe import errors as ce

        try:
            return await asyncio.to_thread(self.pool.count_prompt_tokens, name, messages)
        except ce.RequestError as e:
            return _err(ErrorKind.REQUEST, e.code, e.message, e.param)
        except ce.ExpertLoadError as e:
            await self._mark_failed(name, e.reason)
            return _load_failed(str(e))
        except ce.ExpertNotServed as e:
            return _err(ErrorKind.REQUEST, "model_not_found", f"expert '{name}' is being removed: {e}")
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            await self._mark_failed(name, reason)
            return _load_failed(f"expert '{name}' could not be loaded: {reason}")

    async def _mark_failed(self, name: str, reason: str) -> None:
        try:
            await asyncio.to_thread(self._watcher.registry.set_status, name, "failed", reason)
        except Exception as e:
            log.warning("could not mark %s failed in the registry: %s", name, e)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[dict]:
        """Stream one chat completion from the expert named by the multiplexed model id.

        ``request`` is the typed :class:`coe.generate_request.GenerateRequest` the ingress built
        (``ChatCompletionRequest.to_generate_request``); here only the expert's defaults and its
        context window are applied to it."""
        from coe import errors as ce

        name = serve.get_multiplexed_model_id()
        self.pool.tiers.metrics.event(name, f"request {request.request_id or '-'}")
        await self._ensure_started()
        err = await self._ensure_expert(name)
        if err:
            yield err
            return
        spec = self._watcher.snapshot.experts.get(name)
        messages = request.messages
        gen = spec.generation if spec is not None else None
        sampling = request.sampling
        max_tokens = sampling.max_tokens if "max_tokens" in sampling.model_fields_set else (gen.max_tokens if gen else 256)
        prompt_tokens = await self._prompt_tokens(name, messages)
        if isinstance(prompt_tokens, dict):  # an error item
            yield prompt_tokens
            return
        if spec is not None:
            err = _context_error(name, prompt_tokens, max_tokens, spec.max_context, request.max_tokens_explicit)
            if err:
                yield err
                return
            max_tokens = min(max_tokens, spec.max_context - prompt_tokens)
        params = sampling.model_copy(update={"max_tokens": max_tokens}).with_defaults(gen)
        # the request's own checks come first (a 400 does not depend on the engine having started);
        # then an engine still starting after its add is waited for, or answered expert_loading
        err = await self._until_started(name, request.loading_wait_s)
        if err:
            yield err
            return
        # wall-clock stamps (same machine as the ingress) let a client split its latency into
        # ingress -> pool and pool -> client (``x-coe-timing``; bench/service_gpu.py --overhead);
        # replica and node name who served it (``x-coe-replica``/``x-coe-node``)
        yield {"type": "start", "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "enqueued_at": time.time(),
               "replica": self._replica, "node": self._node}
        t0 = time.monotonic()
        try:
            async for chunk in self.pool.generate(name, messages, params):
                yield {"type": "chunk", "text": chunk.text, "finish_reason": chunk.finish_reason,
                       "prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
                       "index": chunk.index, "at": time.time(),
                       "logprobs": [lp.model_dump() for lp in chunk.logprobs] if chunk.logprobs else None,
                       "tool_calls": [tc.model_dump() for tc in chunk.tool_calls] if chunk.tool_calls else None}
                if chunk.finish_reason is not None and chunk.index == 0:
                    self._latency.observe(time.monotonic() - t0)
        except ce.RequestError as e:
            yield _err(ErrorKind.REQUEST, e.code, e.message, e.param)
        except ce.QueueFull as e:
            from coe.limits import retry_after_s

            st = self.pool.state().get(name)
            wait = retry_after_s(st.queue_depth if st else 0, self.pool.config.max_batch_size, self._latency.value,
                                 self.cfg.limits.retry_after_min_s, self.cfg.limits.retry_after_max_s)
            yield _err(ErrorKind.TRANSIENT, "queue_full", f"{e}; retry in {wait} s", None, wait)
        except ce.ExpertNotServed as e:
            yield _err(ErrorKind.REQUEST, "model_not_found", f"expert '{name}' was removed: {e}")
        except ce.ExpertLoadError as e:
            await self._mark_failed(name, e.reason)
            yield _load_failed(str(e))
        except ce.ExpertTransientError as e:  # retried inside the pool; the registry is not touched
            yield _transient(e)
        except ce.PoolClosed as e:  # this replica is shutting down: another one (or a retry) serves it
            yield _err(ErrorKind.TRANSIENT, "expert_unavailable", f"expert '{name}': {e}", retry_after_s=1.0)

    async def prefetch_hint(self, name: str, request_id: str | None = None) -> bool:
        """Router -> pool, fire and forget: a request for ``name`` is on its way (stage 1 was
        confident). The expert joins this replica's pool if needed and starts moving up as a
        prefetch (``ExpertPool.prefetch_hint``); never an error: the request reports problems."""
        try:
            if name not in self.pool.experts():  # (in the pool already: no await before the hint counts)
                await self._ensure_started()
                if await self._ensure_expert(name):
                    return False
            return self.pool.prefetch_hint(name, request_id)
        except Exception as e:  # noqa: BLE001 - a hint must never take anything down
            log.debug("prefetch hint for %s failed: %s", name, e)
            return False

    def recent_events(self, n: int = 200) -> list[tuple[float, str, str]]:
        """The pool's last ``n`` events (monotonic time, expert, what): hints, request arrivals,
        tier moves, evictions, in the order they happened in this replica."""
        return [tuple(e) for e in self.pool.tiers.metrics.events[-n:]]

    async def sync(self, demand: dict[str, int] | None = None) -> dict[str, float]:
        """Router -> pool: recent demand per expert (prefetch hint); pool -> router: residency."""
        await self._ensure_started()
        if demand:
            try:
                self.pool.hint_demand(demand)
            except Exception as e:
                log.debug("hint_demand failed: %s", e)
        return dict(self.pool.residency_hint())

    async def record_routing_stats(self) -> dict:
        """Serve's controller polls this (``pool.routing_stats_period_s``) and pushes what changed
        to every handle's request router (``coe.serve.pool_routing``): node, and per expert its tier,
        status and queue depth. Through Ray, never Redis (decision 3)."""
        from coe.serve.pool_view import replica_stats

        return replica_stats(self._replica, self._node, self.pool.state(), self.pool.residency_hint())

    async def stats(self) -> dict:
        """This replica's snapshot (the ingress renders it at ``/metrics``)."""
        from coe.metrics import pool_snapshot

        await self._ensure_started()
        return pool_snapshot(self._replica, self.pool.state(), self.pool.metrics())

    async def _set_gauges(self) -> None:
        """Tier and queue gauges from the pool's state, set in this process for Ray's metrics
        pipeline (swaps are observed as they happen, see ``_observe_swap``)."""
        told = False
        while True:
            try:
                _set_pool_gauges(self._ray_gauges, self.pool.state(), self.pool.metrics())
                told = self._watchdog(told)
            except Exception as e:  # noqa: BLE001 - metrics must not take serving down
                log.debug("setting pool gauges failed: %s", e)
            await asyncio.sleep(GAUGES_EVERY_S)

    def _watchdog(self, told: bool) -> bool:
        """Log the pool's whole state once when a request has waited past ``pool.watchdog_s``
        (queued, or with no token), to the replica's log (Serve's logger writes it there); again
        only after every wait has come back under the limit. Returns whether it has told."""
        limit = self.pool.config.watchdog_s
        waited = self.pool.longest_wait_s()
        if limit is None or waited < limit:
            return False
        if not told:
            import json

            logging.getLogger("ray.serve").error("coe pool watchdog: a request has waited %.0f s (pool.watchdog_s "
                                                 "%.0f); pool state: %s", waited, limit,
                                                 json.dumps(self.pool.diagnose(), default=str))
        return True

    def __del__(self):
        if self._gauge_task:
            self._gauge_task.cancel()


def _replica_tag() -> str:
    try:
        ctx = serve.get_replica_context()
        return ctx.replica_tag if hasattr(ctx, "replica_tag") else str(ctx.replica_id.unique_id)
    except Exception:
        return f"pid{os.getpid()}"


def _node_id() -> str:
    """The Ray node this replica runs on (what a user sees in ``ray status`` / the dashboard)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


def _pool_gauges() -> dict | None:
    """The pool's Ray metrics (names in docs/serving.md); None outside a Ray worker."""
    try:
        from ray.serve import metrics as rm

        return {
            "queue": rm.Gauge("coe_queue_depth", "Requests waiting per expert", tag_keys=("expert",)),
            "in_flight": rm.Gauge("coe_expert_in_flight", "Requests generating per expert", tag_keys=("expert",)),
            "tier": rm.Gauge("coe_expert_tier", "1 for the tier each expert is in", tag_keys=("expert", "tier")),
            "expert_hbm": rm.Gauge("coe_expert_hbm_bytes", "Device bytes counted for the expert (awake or asleep)",
                                   tag_keys=("expert",)),
            "tier_bytes": rm.Gauge("coe_tier_bytes", "Bytes counted per tier", tag_keys=("tier",)),
            "tier_budget": rm.Gauge("coe_tier_budget_bytes", "Tier budget, bytes", tag_keys=("tier",)),
            "tier_peak": rm.Gauge("coe_tier_peak_bytes", "Peak bytes counted per tier", tag_keys=("tier",)),
            "swaps": rm.Counter("coe_swaps", "Tier moves, per expert and src->dst", tag_keys=("expert", "src", "dst")),
            "swap_seconds": rm.Counter("coe_swap_seconds", "Seconds spent moving weights, per expert and src->dst",
                                       tag_keys=("expert", "src", "dst")),
            "swap_latency": rm.Histogram("coe_swap_latency_seconds", "Duration of each tier move",
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120],
                                         tag_keys=("expert", "src", "dst")),
        }
    except Exception:
        return None


def _observe_swap(g: dict, name: str, rec: Any) -> None:
    """One tier move, observed where it happens (its own duration, not a window's mean)."""
    tags = {"expert": name, "src": rec.src.value, "dst": rec.dst.value}
    g["swaps"].inc(1, tags=tags)
    if rec.seconds > 0:
        g["swap_seconds"].inc(rec.seconds, tags=tags)
    g["swap_latency"].observe(rec.seconds, tags=tags)


def _set_pool_gauges(g: dict | None, state: dict, m: dict) -> None:
    if not g:
        return
    charged = m.get("charged_bytes") or {}
    for name, st in state.items():
        g["queue"].set(st.queue_depth, tags={"expert": name})
        g["in_flight"].set(st.in_flight, tags={"expert": name})
        for tier in ("hbm", "dram", "disk"):
            g["tier"].set(1 if st.tier == tier else 0, tags={"expert": name, "tier": tier})
        g["expert_hbm"].set((charged.get(name) or {}).get("hbm", 0), tags={"expert": name})
    for key, gauge in (("bytes", "tier_bytes"), ("budget_bytes", "tier_budget"), ("peak_bytes", "tier_peak")):
        for t, v in (m.get(key) or {}).items():
            g[gauge].set(v, tags={"tier": t})
