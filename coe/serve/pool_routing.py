"""Which ExpertPool replica serves a request: Ray Serve's request-router API, fed by residency
that every pool replica reports through Ray.

Why a custom request router and not plain ``@serve.multiplexed`` routing: Serve's multiplexing
knows which replicas *hold* an expert (its multiplexed model ids), not in which tier. With one
pool replica per node (DESIGN decision 1) an expert is often held by several nodes — in HBM on
one, asleep in DRAM on another — and a request should go to the node where it is hot.

How it works (docs/serving.md, "Several nodes"):

* every pool replica answers Serve's ``record_routing_stats`` (polled by the Serve controller
  every ``pool.routing_stats_period_s``) with :func:`coe.serve.pool_view.replica_stats`: its node, and per expert the
  tier, status and queue depth. The controller pushes changes to every handle's request router;
  nothing goes through Redis (decision 3);
* :class:`ResidencyRequestRouter` (one per process that holds a pool handle: the ingress, the
  router) ranks replicas for a request whose ``multiplexed_model_id`` is an expert: (1) replicas
  holding it in HBM and ready, (2) replicas holding it in any tier (from the stats or Serve's own
  multiplexed ids, which arrive sooner), and only when none holds it — or after
  ``spill_after_s`` when every holder is full — (3) the replicas holding the fewest experts, then
  (4) the rest. Within a rank Serve picks the replica with the shortest queue that accepts;
* a multiplexed model id ``replica:<id>`` (not a valid expert name) targets one replica: the
  router deployment uses it to send each replica its share of the demand hint and to read its
  residency (:func:`coe.serve.pool_view.replica_target`);
* the latest view of every replica is kept per process (:func:`coe.serve.pool_view.cluster_view`), so the router
  deployment merges residency from every replica without a call of its own.
"""

from __future__ import annotations

import random
import time
from typing import Any

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from coe.serve.pool_view import TARGET_PREFIX, ReplicaView, forget, publish, rank_replicas

#: the class path Serve's ``RequestRouterConfig`` takes
ROUTER_PATH = "coe.serve.pool_routing:ResidencyRequestRouter"
#: how long a request waits for a replica that holds its expert before any replica may take it
DEFAULT_SPILL_AFTER_S = 2.0


def _view_of(r: RunningReplica) -> ReplicaView:
    stats = r.routing_stats or {}
    return ReplicaView(replica=r.replica_id.unique_id, node=str(stats.get("node") or r.node_id or ""),
                       experts=dict(stats.get("experts") or {}), multiplexed=frozenset(r.multiplexed_model_ids))


class ResidencyRequestRouter(MultiplexMixin, RequestRouter):
    """Send a request to the pool replica that holds its expert hot (see the module docstring).

    Without Serve's ``FIFOMixin`` on purpose: it may hand a replica chosen for one request to
    another waiting request (for another expert, or aimed at another replica); the base class
    gives each chosen replica to exactly the request it was chosen for."""

    def initialize_state(self, spill_after_s: float = DEFAULT_SPILL_AFTER_S, **_: Any) -> None:
        self._spill_after_s = float(spill_after_s)
        self._key = (self._deployment_id.app_name, self._deployment_id.name)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        publish(*self._key, {v.replica: v for v in map(_view_of, replicas)})

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        forget(*self._key, replica_id.unique_id)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        # Serve takes the first replica with the shortest queue in a rank: shuffled, so that equally
        # loaded replicas share the work
        anyone = random.sample(candidate_replicas, len(candidate_replicas))
        if pending_request is None:
            return [anyone]
        pending_request.routing_context.should_backoff = True  # nothing fits now: wait a little, try again
        model = pending_request.metadata.multiplexed_model_id
        if not model:  # stats, sync(None): any replica, the shortest queue
            return [anyone]
        if model.startswith(TARGET_PREFIX):
            want = model[len(TARGET_PREFIX):]
            target = [r for r in candidate_replicas if r.replica_id.unique_id == want]
            return [target] if target else [anyone]  # gone: any replica answers (it says which)
        ctx = pending_request.routing_context
        if not ctx.multiplexed_start_matching_time:
            ctx.multiplexed_start_matching_time = time.time()
        by_id = {r.replica_id.unique_id: r for r in anyone}
        ranks = rank_replicas([_view_of(r) for r in anyone], model,
                              time.time() - ctx.multiplexed_start_matching_time, self._spill_after_s)
        return [[by_id[i] for i in rank] for rank in ranks]
