"""The pool's request-routing policy (coe/serve/pool_view.py) on the reports replicas send.

The policy is a pure function of what every replica reported, so it is tested here on coe's own
types; tests/serve/test_multinode.py runs it inside Ray Serve on a two-node cluster."""

from __future__ import annotations

import pytest

from coe.config import ServeConfig
from coe.pool import ExpertState
from coe.serve.pool_view import ReplicaView, merged_residency, rank_replicas, replica_stats, replica_target


def view(replica: str, **experts: tuple[str, str, int]) -> ReplicaView:
    return ReplicaView(replica=replica, node=f"node-{replica}",
                       experts={n: {"tier": t, "status": s, "queue": q} for n, (t, s, q) in experts.items()})


def test_the_replica_holding_the_expert_hot_comes_first():
    a = view("a", code=("dram", "ready", 0))
    b = view("b", code=("hbm", "ready", 3), math=("hbm", "ready", 0))
    c = view("c")
    assert rank_replicas([a, b, c], "code", 0.0, 2.0) == [["b"], ["a"]]  # c (idle, empty) is not offered


def test_a_loading_or_sleeping_copy_counts_as_held_a_failed_one_does_not():
    a = view("a", code=("disk", "loading", 0))
    b = view("b", code=("disk", "failed", 0))
    c = view("c", math=("hbm", "ready", 0))
    assert rank_replicas([a, b, c], "code", 0.0, 2.0) == [["a"]]


def test_no_holder_goes_to_the_replicas_holding_fewest_experts():
    a = view("a", x=("hbm", "ready", 0), y=("hbm", "ready", 0))
    b = view("b", z=("hbm", "ready", 0))
    c = view("c", w=("dram", "ready", 0))
    assert rank_replicas([a, b, c], "new", 0.0, 2.0) == [["b", "c"], ["a"]]


def test_after_the_spill_wait_every_replica_may_take_it():
    a = view("a", code=("hbm", "ready", 9))
    b = view("b")
    assert rank_replicas([a, b], "code", 0.5, 2.0) == [["a"]]
    assert rank_replicas([a, b], "code", 2.5, 2.0) == [["a"], ["b"]]


def test_serve_multiplexed_ids_count_before_the_first_report():
    fresh = ReplicaView(replica="a", node="n", experts={}, multiplexed=frozenset({"code"}))
    assert rank_replicas([fresh, view("b")], "code", 0.0, 2.0) == [["a"]]


def test_report_and_merged_residency():
    st = {"code": ExpertState(tier="hbm", status="ready", queue_depth=2, in_flight=1)}
    rep = replica_stats("r1", "n1", st, {"code": 0.5})
    assert rep == {"replica": "r1", "node": "n1",
                   "experts": {"code": {"tier": "hbm", "status": "ready", "queue": 3, "residency": 0.5}}}
    other = ReplicaView("r2", "n2", {"code": {"residency": 0.2}, "math": {"residency": 1.0}})
    mine = ReplicaView("r1", "n1", rep["experts"])
    assert merged_residency({"r1": mine, "r2": other}) == {"code": 0.5, "math": 1.0}
    assert replica_target("r1") == "replica:r1"


def test_placement_settings_are_typed():
    cfg = ServeConfig.model_validate({"pool": {"num_replicas": 3, "node_resource": "coe_pool"}})
    assert (cfg.pool.max_replicas_per_node, cfg.pool.node_resource) == (1, "coe_pool")
    with pytest.raises(Exception, match="node_resource"):
        ServeConfig.model_validate({"pool": {"node_resource": "coe pool; rm"}})
    with pytest.raises(Exception, match="max_replicas_per_node"):
        ServeConfig.model_validate({"pool": {"max_replicas_per_node": 0}})
