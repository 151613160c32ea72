"""``RouterDeployment``: a thin Ray Serve shell over the plain :class:`routers.router.Router`.

Concurrent requests are batched with ``@serve.batch`` (one encoder pass for the batch, through
``Router.route_batch``). The router keeps its own registry snapshot (pub/sub + poll), and every
``residency_refresh_s`` it tells every pool replica what was asked for (demand, a prefetch hint)
and learns what each holds resident, merged over the replicas (a routing bonus). Answers are dicts:
``{"decision": {...}}`` or ``{"error": report}``, ``report`` a :class:`coe.errors.ErrorReport` as a
dict (no HTTP status: the ingress maps it).
Feedback records in Redis join the quality predictor as they arrive (:mod:`coe.serve.feedback_watch`),
and a confident stage 1 warms the likely expert before stage 2 ends (:mod:`coe.serve.warm_hint`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from coe.config import ServeConfig
from coe.errors import ErrorKind, ErrorReport

log = logging.getLogger("coe.serve.router")


def load_router(path: str | None):
    """``Router.load(path)`` or the trained default (cached under ``state_dir("router")``)."""
    from routers.router import Router

    return Router.load(path) if path else Router.default()


def route_error(exc: Exception, request: dict) -> ErrorReport:
    """A router exception as the typed report the ingress maps to HTTP (decision 2)."""
    from routers.errors import NoEligibleExpert, UnknownModel

    if isinstance(exc, UnknownModel):
        return ErrorReport(kind=ErrorKind.REQUEST, code="model_not_found", message=str(exc), param="model")
    if isinstance(exc, NoEligibleExpert):
        if request.get("max_tokens") and any("context" in r for r in exc.reasons.values()):
            return ErrorReport(kind=ErrorKind.REQUEST, code="context_length_exceeded", message=str(exc),
                               param="max_tokens")
        return ErrorReport(kind=ErrorKind.PERMANENT, code="no_eligible_expert", message=str(exc), param="model")
    if isinstance(exc, (ValueError, TypeError)):
        return ErrorReport(kind=ErrorKind.REQUEST, code="invalid_value", message=str(exc))
    log.exception("router failed", exc_info=exc)
    return ErrorReport(kind=ErrorKind.INTERNAL, message=f"router failed: {type(exc).__name__}: {exc}")


def needs_encoder(request: dict, experts: Any) -> bool:
    """Whether routing ``request`` runs stage 1 (``Router.route_batch`` skips it for a registered
    expert named by the client)."""
    from routers.policy import names_expert

    return not names_expert(request.get("model"), experts)


def route_answer(result: Any, request: dict, registry_version: int) -> dict:
    """A decision (or the exception that replaced it) as the answer ``route`` gives the ingress."""
    if isinstance(result, Exception):
        return {"error": route_error(result, request).model_dump(mode="json")}
    return {"decision": result.model_dump(mode="json"), "registry_version": registry_version}


@serve.deployment(name="Router")
class RouterDeployment:
    async def __init__(self, config: dict, pool: DeploymentHandle | None = None):
        from coe.serve.registry_watch import RegistryWatcher

        self.cfg = ServeConfig.model_validate(config)
        self.router = await asyncio.to_thread(load_router, self.cfg.router.path)
        self.feedback_watcher = await self._follow_feedback()
        self._route_batch.set_max_batch_size(self.cfg.router.max_batch_size)
        self._route_batch.set_batch_wait_timeout_s(self.cfg.router.batch_wait_timeout_s)
        self.pool = pool
        self.residency: dict[str, float] = {}
        self.demand: Counter[str] = Counter()
        self._routing = 0  # requests inside route() that need the encoder (waiting for a batch or in one)
        self.watcher = RegistryWatcher(self.cfg.redis_url, self.cfg.namespace, self.cfg.registry_poll_s)
        await self.watcher.start()
        await asyncio.to_thread(self._publish_categories)
        self._sync_task = asyncio.create_task(self._sync_loop()) if pool is not None else None
        from coe.serve.warm_hint import WarmHinter

        self.hinter = (WarmHinter(pool, asyncio.get_running_loop(), self.cfg.router.warm_hint_min_prob)
                       if pool is not None and self.cfg.router.warm_hint else None)

    async def _follow_feedback(self):
        """Serve the trained router plus the feedback records in Redis, rebuilt on each change
        (:mod:`coe.serve.feedback_watch`); None when feedback is off."""
        if not self.cfg.feedback.enabled:
            return None
        from coe.feedback_quality import FeedbackRouter
        from coe.serve.feedback_watch import FeedbackWatcher

        self.with_feedback = FeedbackRouter(self.router)

        async def rebuild(records: dict) -> None:
            self.router = await asyncio.to_thread(self.with_feedback.build, records)
            log.info("router: %d feedback record(s) in the quality predictor", len(records))

        w = FeedbackWatcher(self.cfg.redis_url, self.cfg.namespace, self.cfg.feedback, self.cfg.registry_poll_s,
                            on_change=rebuild)
        try:
            await w.start()
        except Exception as e:  # Redis away at start: serve without feedback until it is back
            log.warning("feedback records unavailable at start: %s", e)
        return w

    def feedback_status(self) -> dict:
        """How many feedback records this replica's quality predictor holds (tests, operators)."""
        w = self.feedback_watcher
        q = self.router.quality
        return {"enabled": w is not None, "records": len(w.records) if w else 0, "version": w.version if w else None,
                "quality_records": len(q.experts) if q is not None else 0,
                "warm_hints_sent": self.hinter.sent if self.hinter else None}

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.router.residency_refresh_s)
            demand, self.demand = dict(self.demand), Counter()
            try:
                self.residency = await self._sync_all(demand)
            except Exception as e:
                log.debug("pool sync failed: %s", e)

    async def _sync_all(self, demand: dict[str, int]) -> dict[str, float]:
        """Tell every pool replica the demand (each keeps what it holds, as a prefetch hint) and
        merge their residency: per expert the best any replica reports (decision 1). The replica
        list is the one Serve gives this process's pool handle (``coe.serve.pool_routing``)."""
        from coe.serve.pool_view import cluster_view, replica_target

        replicas = sorted(cluster_view())  # this process holds handles of its own app only
        if len(replicas) <= 1:  # one replica, or the handle has not seen the list yet
            return await self.pool.sync.remote(demand)
        answers = await asyncio.gather(
            *(self.pool.options(multiplexed_model_id=replica_target(r)).sync.remote(demand) for r in replicas),
            return_exceptions=True)
        merged: dict[str, float] = {}
        for a in answers:
            if isinstance(a, BaseException):  # a replica restarting: the others still count
                log.debug("pool sync failed on one replica: %s", a)
                continue
            for name, v in a.items():
                merged[name] = max(merged.get(name, 0.0), float(v))
        return merged

    def _publish_categories(self) -> None:
        """Tell ``coe-registry`` which categories this router knows (decision 6), so a typo such as
        ``code`` for ``coding`` is refused at the door instead of failing silently at request time."""
        try:
            self.watcher.registry.publish_categories(self.router.categories, self.cfg.router.path or "default")
        except Exception as e:  # Redis down at start: the CLI then warns and checks the default taxonomy
            log.warning("could not publish the router's categories: %s", e)

    def categories(self) -> list[str]:
        return list(self.router.categories)

    async def route(self, request: dict) -> dict:
        """Route one request: ``{prompt, model, prompt_tokens?, max_tokens?, min_version?, allowed?}``.

        ``allowed`` (expert names) is the ingress's hard constraint: experts whose engine honours
        every feature the request needs and that the caller's key may use.

        ``min_version`` is the registry version the caller has seen: if this replica is behind
        (a pub/sub message still in flight), it re-reads the registry first, so an expert added a
        moment ago is routable on the very next request.

        Only requests that need the encoder wait for a batch (``router.batch_wait_timeout_s``), and
        only while another one is being routed: a named expert is routed at once, in this event loop
        (a registry lookup and the hard constraints, microseconds), and a request that finds the
        router idle is routed alone at once, since no batch could form around it without waiting
        (issue 13 item 6: the wait was ~5 ms of every request at low load). Under load, requests
        overlap and are batched as before; the decisions are the same either way."""
        if request.get("min_version", 0) > self.watcher.snapshot.version:
            await self.watcher.refresh()
        if not needs_encoder(request, self.watcher.snapshot.experts):
            return (await self._route_many([request], in_thread=False))[0]
        idle = self._routing == 0
        self._routing += 1
        try:
            return (await self._route_many([request]))[0] if idle else await self._route_batch(request)
        finally:
            self._routing -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _route_batch(self, requests: list[dict]) -> list[dict]:
        return await self._route_many(requests)

    async def _route_many(self, requests: list[dict], in_thread: bool = True) -> list[dict]:
        """Route requests together (one encoder pass for those that need it); ``in_thread=False``
        only for requests that need no encoder (nothing there blocks the event loop)."""
        snap = self.watcher.snapshot
        experts = snap.experts
        kwargs = [
            dict(prompt=r["prompt"], model=r.get("model") or "coe", experts=experts,
                 category_map=snap.category_map, residency=self.residency,
                 prompt_tokens=r.get("prompt_tokens"), max_tokens=r.get("max_tokens"),
                 allowed=set(r["allowed"]) if r.get("allowed") is not None else None)
            for r in requests
        ]
        router = self.router  # one router for the whole batch, even if feedback swaps it meanwhile
        on_stage1 = None
        if self.hinter is not None:
            pol = router.policy.config
            residency = dict(self.residency)

            def on_stage1(i: int, probs: dict[str, float]) -> None:
                self.hinter(requests[i], probs, snap, pol.map_capability, residency, pol.residency_weight)
        try:
            results: list[Any] = (await asyncio.to_thread(router.route_batch, kwargs, on_stage1) if in_thread
                                  else router.route_batch(kwargs, on_stage1))
        except Exception as e:  # the batch itself failed (encoder error …): every request gets it
            results = [e] * len(requests)
        out = [route_answer(d, r, snap.version) for d, r in zip(results, requests)]
        for o in out:
            if "decision" in o:
                self.demand[o["decision"]["expert"]] += 1
        return out

    async def note_demand(self, counts: dict[str, int]) -> None:
        """Ingress -> router: requests for experts the clients named, which the ingress routed itself
        (:func:`routers.policy.route_named`, no call here on their path); they join the demand this
        replica tells the pools at its next sync, as if they had been routed here. (Async: it runs on
        the replica's event loop, like the routing that counts the rest, not in Serve's thread pool.)"""
        self.demand.update({str(k): int(v) for k, v in counts.items()})
