"""Service configuration: one pydantic model, read from YAML (``coe serve --config``) or from the
``args`` of ``deploy/serve_config.yaml`` (Ray Serve passes them to ``coe.serve.app:build_app``).

Environment overrides (``COE_REDIS_URL``, ``COE_NAMESPACE``) apply when the file leaves them unset,
so one config file works on a laptop (embedded Redis) and in a cluster (Redis from a Secret).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coe.affinity import AffinityConfig
from coe.feedback import FeedbackConfig
from coe.limits import RequestLimits
from coe.pool import PoolConfig


class IngressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = 0.1
    max_ongoing_requests: int = 256


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(default=None, description="a `coe router train` output dir; None = Router.default()")
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = 0.2
    max_batch_size: int = Field(default=16, ge=1)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    residency_refresh_s: float = Field(default=1.0, gt=0)
    warm_hint: bool = Field(default=True, description="tell the pool the likely expert as soon as stage 1 is "
                                                      "confident, so a switch starts before stage 2 and queueing end")
    warm_hint_min_prob: float = Field(default=0.6, ge=0.0, le=1.0,
                                      description="top-category probability from which stage 1 counts as confident")


class PoolDeploymentConfig(BaseModel):
    """How many ExpertPool replicas, on what, and the ``PoolConfig`` each one builds."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: int = Field(default=1, ge=1, description="one per node (decision 1): the number of pool nodes")
    max_replicas_per_node: int | None = Field(
        default=1, ge=1,
        description="Serve's placement cap: 1 = one pool replica per node (decision 1); null lifts it (several "
                    "replicas on one machine, e.g. one per GPU until per-GPU budgets inside a replica land)")
    node_resource: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$",
        description="a custom Ray resource the pool nodes advertise (`ray start --resources='{\"coe_pool\": 1}'`); "
                    "each replica asks for 1 of it, so replicas land only on those nodes")
    routing_stats_period_s: float = Field(
        default=1.0, gt=0,
        description="how often Serve's controller asks every pool replica for its residency and queue depth "
                    "(record_routing_stats), which every handle's request router then uses")
    spill_after_s: float = Field(
        default=2.0, ge=0,
        description="a request waits this long for a replica that holds its expert (all full) before any "
                    "replica may take it and load the expert too")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_cpus: float = 0.5
    num_gpus: float | None = Field(default=None, description="None = 1 when device is cuda, else 0")
    max_experts_per_replica: int = Field(default=16, ge=1, description="multiplexed model ids a replica holds")
    max_ongoing_requests: int = Field(
        default=1024, ge=1,
        description="Serve's cap per replica; keep it above experts x (max_queue_per_expert + max_batch_size) so a "
                    "full expert queue answers 429 at once instead of requests waiting in front of the replica")
    options: PoolConfig = Field(default_factory=PoolConfig,
                                description="the PoolConfig each replica builds (budgets, policy, engine defaults …)")

    @model_validator(mode="after")
    def _one_device_setting(self) -> "PoolDeploymentConfig":
        if self.options.device != PoolConfig.model_fields["device"].default:  # the dump round-trips "cpu"
            raise ValueError("set the device as pool.device, not pool.options.device")
        return self

    def pool_config(self) -> PoolConfig:
        """The replica's PoolConfig on the resolved device."""
        return self.options.model_copy(update={"device": self.resolved_device()})

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:  # pragma: no cover - torch missing
            return "cpu"


class SecurityConfig(BaseModel):
    """What the service lets experts do. API keys are not configured here: they live in the
    registry's Redis (``coe keys``) and ``COE_API_KEYS`` (coe/keys.py)."""

    model_config = ConfigDict(extra="forbid")
    allow_remote_code: bool = Field(
        default=False, description="let experts whose entry sets trust_remote_code run their model folder's Python "
                                   "inside the pool; off: such experts are refused (marked failed, with the reason)")


class ShutdownConfig(BaseModel):
    """What ``coe serve`` does on SIGTERM / Ctrl-C (docs/serving.md, "Stopping").

    The default drain is Kubernetes' default grace period (``terminationGracePeriodSeconds: 30``):
    a pod that drains for as long as Kubernetes waits is never killed mid-answer by the kubelet.
    Ray Serve's ``graceful_shutdown_timeout_s`` of every coe deployment is set a little above it
    (:meth:`ray_graceful_timeout_s`), so Ray never kills a replica that is still draining."""

    model_config = ConfigDict(extra="forbid")
    drain_timeout_s: float = Field(
        default=30.0, ge=0, le=3600,
        description="after SIGTERM/SIGINT: new requests get 503 shutting_down at once, /readyz turns 503, "
                    "requests in flight get this long to finish; a stream still running then ends with an "
                    "error event and [DONE]")

    def ray_graceful_timeout_s(self) -> float:
        """Ray Serve's per-replica grace: the drain plus the time cut streams get to end cleanly."""
        from coe.api.drain import CUT_GRACE_S

        return self.drain_timeout_s + CUT_GRACE_S


class ServeConfig(BaseModel):
    """Everything ``coe serve`` and ``build_app`` need."""

    model_config = ConfigDict(extra="forbid")
    app_name: str = "coe"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    ray_address: str | None = Field(
        default=None,
        description="a Ray cluster for `coe serve` to join (host:port of its GCS, or ray://…). Unset (the default): "
                    "`coe serve` starts a Ray head of its own, with its files under COE_HOME, and never joins one it "
                    "finds (RAY_ADDRESS, a ray_current_cluster file: issue 24)")
    redis_url: str | None = None
    namespace: str = "default"
    registry_poll_s: float = Field(default=5.0, gt=0, description="safety-net poll of the registry version")
    demo: bool = False
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    pool: PoolDeploymentConfig = Field(default_factory=PoolDeploymentConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    conversation: AffinityConfig = Field(default_factory=AffinityConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)

    def with_env(self) -> "ServeConfig":
        """Fill unset fields from the environment (``COE_REDIS_URL``, ``COE_NAMESPACE``)."""
        upd: dict[str, Any] = {}
        if not self.redis_url and os.environ.get("COE_REDIS_URL"):
            upd["redis_url"] = os.environ["COE_REDIS_URL"]
        if self.namespace == "default" and os.environ.get("COE_NAMESPACE"):
            upd["namespace"] = os.environ["COE_NAMESPACE"]
        return self.model_copy(update=upd)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        """Read a config file; a ``serve_config.yaml`` (Ray's format) is accepted too: its first
        application's ``args`` are the coe config."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ValueError(f"config file not found: {p}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
        if isinstance(data, dict) and "applications" in data:
            apps = data.get("applications") or [{}]
            data = dict(apps[0].get("args") or {})
            http = (yaml.safe_load(p.read_text()) or {}).get("http_options") or {}
            data.setdefault("host", http.get("host", "127.0.0.1"))
            data.setdefault("port", http.get("port", 8000))
        try:
            return cls.model_validate(data)
        except ValidationError as err:  # one line that names each wrong key, before any replica starts
            from expert_registry.spec import explain_validation_error

            raise ValueError(explain_validation_error(err, f"config file {p}")) from None
