"""The Ray Serve application: ``build_app(args)`` is the import path ``serve run`` / ``serve deploy``
use (``coe.serve.app:build_app``, see ``deploy/serve_config.yaml``); ``coe serve`` calls it too.

Graph: ``Ingress(config, router, pool)`` → ``Router(config, pool)`` and ``ExpertPool(config)``.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from coe.config import ServeConfig


def resolve_config(args: dict[str, Any] | ServeConfig | None) -> ServeConfig:
    """Args from serve_config.yaml (or a ServeConfig) → a complete config with a Redis URL.

    Without a URL (none in args or ``COE_REDIS_URL``) the embedded Redis is used, started if
    needed (single-machine case; a cluster must give ``COE_REDIS_URL``)."""
    from expert_registry.embedded import resolve_redis_url

    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(args or {})
    cfg = cfg.with_env()
    if not cfg.redis_url:
        cfg = cfg.model_copy(update={"redis_url": resolve_redis_url(None)})
    return cfg


def pool_router_config(cfg: ServeConfig) -> RequestRouterConfig:
    """The pool's request router: a request goes to the replica holding its expert hot
    (``coe.serve.pool_routing``), from the residency each replica reports every period."""
    from coe.serve.pool_routing import ROUTER_PATH

    pc = cfg.pool
    return RequestRouterConfig(
        request_router_class=ROUTER_PATH,
        request_router_kwargs={"spill_after_s": pc.spill_after_s},
        request_routing_stats_period_s=pc.routing_stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 5 * pc.routing_stats_period_s),
    )


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Application:
    """Bind the three deployments with their replica counts and resources from the config."""
    from coe.serve.ingress import Ingress
    from coe.serve.pool_deployment import ExpertPoolDeployment
    from coe.serve.router_deployment import RouterDeployment

    cfg = resolve_config(args)
    conf = cfg.model_dump(mode="json")
    pc = cfg.pool
    device = pc.resolved_device()
    num_gpus = pc.num_gpus if pc.num_gpus is not None else (1.0 if device == "cuda" else 0.0)
    quiet = {"enable_access_log": False}  # internal calls (sync every second) would flood the log
    pool_actor: dict[str, Any] = {"num_cpus": pc.num_cpus, "num_gpus": num_gpus}
    if pc.node_resource:  # only nodes that advertise it take a pool replica
        pool_actor["resources"] = {pc.node_resource: 1}
    # Ray waits this long for a stopping replica's requests before it kills it: the ingress's own
    # drain (shutdown.drain_timeout_s, coe/api/drain.py) plus the time cut streams get to end cleanly
    grace = cfg.shutdown.ray_graceful_timeout_s()
    pool = ExpertPoolDeployment.options(
        logging_config=quiet,
        graceful_shutdown_timeout_s=grace,
        num_replicas=pc.num_replicas,
        max_ongoing_requests=pc.max_ongoing_requests,
        max_replicas_per_node=pc.max_replicas_per_node,
        ray_actor_options=pool_actor,
        request_router_config=pool_router_config(cfg),
    ).bind(conf)
    router = RouterDeployment.options(
        logging_config=quiet,
        graceful_shutdown_timeout_s=grace,
        num_replicas=cfg.router.num_replicas,
        # Serve's default (5) would cap batches at 5 and queue the rest unbounded in the ingress
        max_ongoing_requests=max(64, 4 * cfg.router.max_batch_size),
        ray_actor_options={"num_cpus": cfg.router.num_cpus},
    ).bind(conf, pool)
    from coe.keys import KeyRing, RedisKeyStore
    from coe.security import check_bind

    # loud warning if open beyond loopback (an unreadable key store counts as keys on: fail closed)
    check_bind(cfg.host, KeyRing(RedisKeyStore(cfg.redis_url, cfg.namespace)).configured)
    return Ingress.options(
        num_replicas=cfg.ingress.num_replicas,
        graceful_shutdown_timeout_s=grace,
        max_ongoing_requests=cfg.ingress.max_ongoing_requests,
        # requests waiting in front of the ingress are bounded too: beyond, Serve answers 429 + Retry-After
        max_queued_requests=cfg.limits.max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": max(1, cfg.limits.retry_after_min_s)},
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
    ).bind(conf, router, pool)
