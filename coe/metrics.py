"""coe's metrics, recorded twice from the same numbers: as Ray custom metrics (Ray's Prometheus
endpoint / the dashboard's Metrics view, one series per replica) and as a prometheus_client
registry rendered by the ingress at ``GET /metrics``.

Aggregation across replicas (documented in the README):
- request/token/routing counters are counted where the whole request is seen, in the ingress
  replica; ``/metrics`` shows that replica's counts (one ingress replica by default; with more,
  scrape Ray's endpoint and ``sum by (expert)``).
- pool numbers (bytes per tier, swaps and swap seconds per expert and per src->dst, queue depth,
  tier per expert) live in the pool replicas. They travel through Ray only (decision 3: nothing
  periodic is written to Redis): each replica records Ray metrics (every swap observed as it
  happens, gauges set in-process), and ``/metrics`` asks the pool for its snapshot through its
  deployment handle and renders it labelled by ``replica``. With several pool replicas, Ray's
  Prometheus endpoint has every replica's series (``sum by (expert)``).
"""

from __future__ import annotations

import re

import logging
import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("coe.metrics")

ROUTE_MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
LATENCY_S_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
SWAP_S_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]


def _ray_metrics():
    """Ray's metric classes inside a Serve replica, ray.util.metrics elsewhere, None without Ray."""
    try:
        from ray.serve import metrics as rm  # adds deployment/replica tags automatically

        return rm
    except Exception:  # pragma: no cover - ray missing
        return None


class IngressMetrics:
    """Request-level metrics, recorded by the ingress for every request it answers."""

    def __init__(self, use_ray: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["expert", "category"]
        self.requests = Counter("coe_requests", "Chat completion requests answered, by expert, category and status",
                                labels + ["status"], registry=self.registry)
        self.prompt_tokens = Counter("coe_prompt_tokens", "Prompt tokens processed", labels, registry=self.registry)
        self.completion_tokens = Counter("coe_completion_tokens", "Completion tokens generated", labels,
                                         registry=self.registry)
        self.route_ms = Histogram("coe_route_latency_ms", "Routing decision latency (router deployment), ms",
                                  ["category"], buckets=ROUTE_MS_BUCKETS, registry=self.registry)
        self.request_s = Histogram("coe_request_latency_seconds", "End-to-end chat completion latency",
                                   ["expert"], buckets=LATENCY_S_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("coe_requests_in_flight", "Requests being answered by this ingress",
                               registry=self.registry)
        self.errors = Counter("coe_errors", "Requests refused or failed, by HTTP status", ["status"],
                              registry=self.registry)
        self.invalid_entries = Gauge("coe_registry_invalid_entries",
                                     "Registry entries that cannot be read and are skipped", registry=self.registry)
        # per API key (name): usage for budgets and chargeback; "-" = no key (auth off)
        self.key_requests = Counter("coe_key_requests", "Requests per API key, by outcome", ["key", "status"],
                                    registry=self.registry)
        self.key_tokens = Counter("coe_key_tokens", "Tokens used per API key", ["key", "kind"], registry=self.registry)
        self._ray = None
        rm = _ray_metrics() if use_ray else None
        if rm is not None:
            try:
                self._ray = {
                    "requests": rm.Counter("coe_requests", "Chat completion requests answered",
                                           tag_keys=("expert", "category", "status")),
                    "prompt_tokens": rm.Counter("coe_prompt_tokens", "Prompt tokens", tag_keys=("expert", "category")),
                    "completion_tokens": rm.Counter("coe_completion_tokens", "Completion tokens",
                                                    tag_keys=("expert", "category")),
                    "route_ms": rm.Histogram("coe_route_latency_ms", "Routing latency, ms",
                                             boundaries=ROUTE_MS_BUCKETS, tag_keys=("category",)),
                    "request_s": rm.Histogram("coe_request_latency_seconds", "End-to-end latency",
                                              boundaries=LATENCY_S_BUCKETS, tag_keys=("expert",)),
                    "errors": rm.Counter("coe_errors", "Refused or failed requests", tag_keys=("status",)),
                    "key_requests": rm.Counter("coe_key_requests", "Requests per API key",
                                               tag_keys=("key", "status")),
                    "key_tokens": rm.Counter("coe_key_tokens", "Tokens per API key", tag_keys=("key", "kind")),
                }
            except Exception as e:  # outside a Ray worker the metric classes cannot register
                log.debug("Ray metrics unavailable: %s", e)
                self._ray = None

    def observe_route(self, category: str | None, route_ms: float) -> None:
        cat = category or "none"
        self.route_ms.labels(cat).observe(route_ms)
        if self._ray:
            self._ray["route_ms"].observe(route_ms, tags={"category": cat})

    def observe_request(self, expert: str, category: str | None, status: str, prompt_tokens: int,
                        completion_tokens: int, seconds: float) -> None:
        cat = category or "none"
        self.requests.labels(expert, cat, status).inc()
        self.prompt_tokens.labels(expert, cat).inc(prompt_tokens)
        self.completion_tokens.labels(expert, cat).inc(completion_tokens)
        self.request_s.labels(expert).observe(seconds)
        if self._ray:
            tags = {"expert": expert, "category": cat}
            self._ray["requests"].inc(tags={**tags, "status": status})
            if prompt_tokens:
                self._ray["prompt_tokens"].inc(prompt_tokens, tags=tags)
            if completion_tokens:
                self._ray["completion_tokens"].inc(completion_tokens, tags=tags)
            self._ray["request_s"].observe(seconds, tags={"expert": expert})

    def observe_key(self, key: str | None, status: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Usage of one API key (``key`` = its name; None when auth is off)."""
        k = key or "-"
        self.key_requests.labels(k, status).inc()
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if n:
                self.key_tokens.labels(k, kind).inc(n)
        if self._ray:
            self._ray["key_requests"].inc(tags={"key": k, "status": status})
            for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
                if n:
                    self._ray["key_tokens"].inc(n, tags={"key": k, "kind": kind})

    def observe_error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()
        if self._ray:
            self._ray["errors"].inc(tags={"status": str(status)})

    def render(self, pool_snapshots: Iterable[dict] = ()) -> bytes:
        """Prometheus text: this ingress's counters plus every live pool replica's snapshot."""
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_PoolCollector(list(pool_snapshots)))
        return generate_latest(self.registry) + generate_latest(reg)


_KEY_SERIES = re.compile(rb'^coe_key_\w+\{(?:[^}]*,)?key="((?:[^"\\]|\\.)*)"')


def only_own_key(text: bytes, key_name: str) -> bytes:
    """``text`` without the per-key samples of every key but ``key_name``: a user key reading
    ``/metrics`` sees its own usage, not which other tenants exist (issue 24); admin keys see all."""
    own = key_name.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    out = []
    for line in text.splitlines(keepends=True):
        m = _KEY_SERIES.match(line)
        if m is None or m.group(1) == own:
            out.append(line)
    return b"".join(out)


def pool_snapshot(replica: str, state: dict[str, Any], metrics: dict[str, Any]) -> dict:
    """The JSON a pool replica publishes: per-expert state plus the pool's own counters."""
    experts = {}
    for name, st in state.items():
        get = st.get if isinstance(st, dict) else (lambda k, d=None, _s=st: getattr(_s, k, d))
        tier = get("tier")
        experts[name] = {
            "tier": getattr(tier, "value", tier),
            "status": str(get("status")),
            "phase": get("phase"),
            "error": get("error"),
            "loading_s": get("loading_s"),
            "queue_depth": int(get("queue_depth", 0) or 0),
            "in_flight": int(get("in_flight", 0) or 0),
        }
    return {"replica": replica, "time": time.time(), "experts": experts, "metrics": _jsonable(metrics)}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(getattr(k, "value", k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(getattr(obj, "value", obj))


# ExpertPool.metrics() keys -> (metric name, help, kind). Dicts keyed by tier get a ``tier`` label,
# by "src->dst" a ``src``/``dst`` pair, by expert name an ``expert`` label.
POOL_METRICS: dict[str, tuple[str, str, str]] = {
    "budget_bytes": ("coe_tier_budget_bytes", "Tier budget of the pool replica, bytes", "gauge"),
    "bytes": ("coe_tier_bytes", "Bytes of expert weights held per tier", "gauge"),
    "peak_bytes": ("coe_tier_peak_bytes", "Peak bytes held per tier", "gauge"),
    "swaps": ("coe_swaps", "Tier moves (src->dst)", "counter"),
    "bytes_moved": ("coe_swap_bytes", "Bytes moved between tiers", "counter"),
    "swap_seconds": ("coe_swap_seconds", "Seconds spent moving weights between tiers", "counter"),
    "last_swap_seconds": ("coe_last_swap_seconds", "Duration of the latest move per src->dst", "gauge"),
    "evictions": ("coe_evictions", "Experts evicted from a tier to make room", "counter"),
    "served": ("coe_expert_served", "Requests served per expert by this replica", "counter"),
    "expert_swaps": ("coe_expert_swaps", "Tier moves per expert (src->dst)", "counter"),
    "expert_swap_seconds": ("coe_expert_swap_seconds", "Seconds moving weights per expert (src->dst)", "counter"),
    "charged_bytes": ("coe_expert_bytes", "Bytes counted for each expert per tier (whole footprint)", "gauge"),
}
TIERS = ("hbm", "dram", "disk")


def pool_series(metrics: dict[str, Any]) -> Iterable[tuple[str, str, str, dict[str, str], float]]:
    """(name, help, kind, labels, value) for each number of an ExpertPool.metrics() dict."""
    for key, (name, doc, kind) in POOL_METRICS.items():
        val = metrics.get(key)
        if isinstance(val, bool) or val is None:
            continue
        if isinstance(val, (int, float)):
            yield name, doc, kind, {}, float(val)
        elif isinstance(val, dict):
            for k, v in val.items():
                if isinstance(v, dict):  # per expert: {expert: {"dram->hbm": n}} or {expert: {"hbm": bytes}}
                    for sub, x in v.items():
                        if isinstance(x, (int, float)) and not isinstance(x, bool):
                            lab = dict(zip(("src", "dst"), sub.split("->", 1))) if "->" in sub else {"tier": sub}
                            yield name, doc, kind, {"expert": k, **lab}, float(x)
                    continue
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if "->" in k:
                    src, dst = k.split("->", 1)
                    labels = {"src": src, "dst": dst}
                elif k in TIERS:
                    labels = {"tier": k}
                else:
                    labels = {"expert": k}
                yield name, doc, kind, labels, float(v)


class _PoolCollector:
    """Renders pool replicas' snapshots (asked of the pool through Ray) as Prometheus metrics."""

    def __init__(self, snapshots: list[dict]):
        self.snapshots = snapshots

    def collect(self):
        queue = GaugeMetricFamily("coe_queue_depth", "Requests waiting per expert", labels=["replica", "expert"])
        inflight = GaugeMetricFamily("coe_expert_in_flight", "Requests generating per expert",
                                     labels=["replica", "expert"])
        tier = GaugeMetricFamily("coe_expert_tier", "1 for the tier each expert is in",
                                 labels=["replica", "expert", "tier"])
        fams: dict[str, Any] = {}
        for snap in self.snapshots:
            rep = str(snap.get("replica", "?"))
            for name, e in (snap.get("experts") or {}).items():
                queue.add_metric([rep, name], e.get("queue_depth", 0))
                inflight.add_metric([rep, name], e.get("in_flight", 0))
                tier.add_metric([rep, name, str(e.get("tier"))], 1)
            for name, doc, kind, labels, val in pool_series(snap.get("metrics") or {}):
                keys = ["replica", *labels]
                fam = fams.get(name)
                if fam is None:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    fam = fams[name] = cls(name, doc, labels=keys)
                fam.add_metric([rep, *labels.values()], val)
        yield queue
        yield inflight
        yield tier
        yield from fams.values()
