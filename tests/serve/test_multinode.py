"""Issue 13, item 8: two pool replicas on a two-node Ray cluster; a request goes to the replica
that holds its expert hot.

The cluster runs in a subprocess (tests/serve/multinode_cluster.py): the suite's session Ray
(``serve_app`` in tests/conftest.py) lives in the pytest process, and a process joins one Ray only.
The registry is the suite's real Redis, the experts real tiny ``hf`` models.

Why this shows residency routing and not just Serve's multiplexing: every expert is registered
before the app starts, so *both* replicas add it and start its engine (to DRAM, ``start_on_add``):
both hold it, and Serve's own multiplexed routing would spread requests over both. Only the
replica that served the first request has it in HBM; the pool's request router must send the rest
there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import TINY_CONTEXT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).with_name("multinode_cluster.py")


def _tiny(name: str, model: Path, **caps: float):
    from expert_registry.spec import Expert, GenerationDefaults

    return Expert(name=name, model=str(model), engine="hf", dtype="float32", max_context=TINY_CONTEXT,
                  generation=GenerationDefaults(max_tokens=4, temperature=0.0, top_p=1.0),
                  capabilities=caps or {"general": 0.5}, tags=["test"])


@pytest.fixture(scope="module")
def cluster(redis_url: str, tiny_model_dir: Path):
    from coe.config import ServeConfig
    from expert_registry.store import RedisRegistry

    ns = f"multinode-{uuid.uuid4().hex[:8]}"
    reg = RedisRegistry(redis_url, namespace=ns)
    reg.add(_tiny("tiny-a", tiny_model_dir, general=0.6))
    reg.add(_tiny("tiny-b", tiny_model_dir, math=0.7))
    reg.add(_tiny("tiny-hot", tiny_model_dir, general=0.1))  # in no category: only asked for by name
    reg.set_map({c: ["tiny-a"] for c in ("general", "writing", "coding", "roleplay", "extraction", "humanities")}
                | {c: ["tiny-b"] for c in ("math", "stem", "reasoning")})
    cfg = ServeConfig(host="127.0.0.1", port=free_port(), redis_url=redis_url, namespace=ns, registry_poll_s=2.0,
                      router={"num_cpus": 0.1}, ingress={"num_cpus": 0.1},
                      pool={"device": "cpu", "num_cpus": 0.5, "num_replicas": 2, "node_resource": "coe_pool",
                            "routing_stats_period_s": 0.5, "options": {"max_wait_ms": 20}})
    proc = subprocess.Popen([sys.executable, str(SCRIPT), cfg.model_dump_json()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the two-node cluster did not start (exit {proc.wait(timeout=30)})")
        info = json.loads(line) | {"proc": proc}
        with httpx.Client(base_url=f"http://127.0.0.1:{info['port']}", timeout=60) as http:
            yield info, http
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reg.purge()
        reg.close()


def _ask(http: httpx.Client, model: str) -> httpx.Response:
    r = http.post("/v1/chat/completions", json={"model": model, "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "Say hello."}]})
    assert r.status_code == 200, r.text
    return r


def test_one_pool_replica_on_each_node(cluster):
    info, _ = cluster
    replicas = info["replicas"]
    assert len(replicas) == 2
    assert sorted(replicas.values()) == sorted(info["nodes"]), "each node runs exactly one pool replica"


def test_requests_go_to_the_replica_holding_the_expert_hot(cluster):
    info, http = cluster
    first = _ask(http, "tiny-hot")
    hot, node = first.headers["x-coe-replica"], first.headers["x-coe-node"]
    assert info["replicas"][hot] == node  # the answer names the replica and its node
    assert first.json()["coe"]["replica"] == hot and first.json()["coe"]["node"] == node
    time.sleep(2.0)  # a few routing-stats periods: the routers learn that `hot` has it in HBM
    served = [_ask(http, "tiny-hot").headers["x-coe-replica"] for _ in range(10)]
    assert served == [hot] * 10, f"requests for tiny-hot went to {served}; it is hot on {hot}"
    # the other replica holds it too (started on add), only not in HBM: residency decided, not membership
    proc = info["proc"]
    proc.stdin.write("view\n")
    proc.stdin.flush()
    view = json.loads(proc.stdout.readline())
    other = next(r for r in view if r != hot)
    assert view[hot]["tiny-hot"]["tier"] == "hbm"
    assert view[other]["tiny-hot"]["tier"] != "hbm", view
