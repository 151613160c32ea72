"""What every ExpertPool replica reports to Serve's request routers, and the per-process view of
all replicas built from it (see ``coe.serve.pool_routing`` for how requests are routed with it).

A module of its own because Serve ships the request-router class to each process *by value*
(cloudpickle): module globals next to it would be copies, so the shared view lives here and is
imported by reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: multiplexed-model-id prefix that targets one replica (expert names cannot contain ":")
TARGET_PREFIX = "replica:"


def replica_target(replica_id: str) -> str:
    """The multiplexed model id that sends a call to the replica ``replica_id`` (its unique id)."""
    return TARGET_PREFIX + replica_id


def replica_stats(replica: str, node: str, state: dict[str, Any], residency: dict[str, float]) -> dict[str, Any]:
    """What a pool replica reports to Serve's request routers (small: it is broadcast on change).

    ``state`` is :meth:`coe.pool.ExpertPool.state`, ``residency`` its ``residency_hint``."""
    return {
        "replica": replica,
        "node": node,
        "experts": {
            name: {"tier": st.tier, "status": st.status, "queue": st.queue_depth + st.in_flight,
                   "residency": round(float(residency.get(name, 0.0)), 4)}
            for name, st in state.items()
        },
    }


@dataclass
class ReplicaView:
    """One pool replica as the request router last saw it."""

    replica: str
    node: str
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    multiplexed: frozenset[str] = frozenset()

    def tier(self, expert: str) -> str | None:
        e = self.experts.get(expert)
        return str(e.get("tier")) if e else None

    def is_hot(self, expert: str) -> bool:
        e = self.experts.get(expert)
        return bool(e) and e.get("tier") == "hbm" and e.get("status") == "ready"

    def holds(self, expert: str) -> bool:
        e = self.experts.get(expert)
        if e is not None:
            return e.get("status") not in ("failed", "removing")
        return expert in self.multiplexed

    def queue_depth(self) -> int:
        return sum(int(e.get("queue") or 0) for e in self.experts.values())


def rank_replicas(views: list[ReplicaView], expert: str, waited_s: float, spill_after_s: float) -> list[list[str]]:
    """Replica ids for a request for ``expert``, best rank first (Serve then takes, within the
    first rank that has room, the replica with the shortest queue):

    1. holding it in HBM and ready; 2. holding it in another tier (or loading it);
    only when no replica holds it, or after ``spill_after_s`` of waiting for full holders:
    3. those holding the fewest experts; 4. the rest."""
    hot = [v for v in views if v.is_hot(expert)]
    holding = [v for v in views if v not in hot and v.holds(expert)]
    if (hot or holding) and waited_s < spill_after_s:
        ranks = [hot, holding]
    else:
        others = [v for v in views if v not in hot and v not in holding]
        fewest = min((len(v.experts) for v in others), default=0)
        least = [v for v in others if len(v.experts) == fewest]
        ranks = [hot, holding, least, [v for v in others if v not in least]]
    return [[v.replica for v in r] for r in ranks if r]


_VIEWS: dict[tuple[str, str], dict[str, ReplicaView]] = {}


def publish(app: str, deployment: str, views: dict[str, ReplicaView]) -> None:
    """The request router of this process saw these replicas (called on every update from Serve)."""
    _VIEWS[(app, deployment)] = views


def forget(app: str, deployment: str, replica: str) -> None:
    _VIEWS.get((app, deployment), {}).pop(replica, None)


def cluster_view(deployment: str = "ExpertPool", app: str | None = None) -> dict[str, ReplicaView]:
    """Every pool replica this process's handles know of, by replica id (empty before the first
    call through a pool handle in this process has created its request router)."""
    for (a, d), view in _VIEWS.items():
        if d == deployment and (app is None or a == app):
            return dict(view)
    return {}


def merged_residency(view: dict[str, ReplicaView]) -> dict[str, float]:
    """Per expert, the best residency any replica reports (the router's residency term)."""
    out: dict[str, float] = {}
    for r in view.values():
        for name, e in r.experts.items():
            out[name] = max(out.get(name, 0.0), float(e.get("residency") or 0.0))
    return out


