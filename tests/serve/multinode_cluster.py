"""A two-node local Ray cluster running coe's app, for tests/serve/test_multinode.py.

Run as a script (its own process: the suite's session Ray lives in the pytest process, and one
process can join one Ray only). It starts ``ray.cluster_utils.Cluster`` with two nodes on
loopback, each advertising the custom resource ``coe_pool: 1``, deploys ``build_app`` with two pool
replicas (``pool.node_resource: coe_pool``, at most one per node), waits for ``/readyz``, prints one
JSON line ``{"port", "nodes", "replicas": {replica_id: node_id}}`` and serves until stdin closes;
a line ``view`` on stdin is answered with every replica's experts and their tiers (one JSON line).

    python tests/serve/multinode_cluster.py CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time

import httpx


def main(config_json: str) -> None:
    from coe.ray_local import secure_token, single_machine_mode

    single_machine_mode()  # every node on 127.0.0.1, every Ray port on loopback
    secure_token()
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from coe.config import ServeConfig
    from coe.serve.app import build_app

    cfg = ServeConfig.model_validate_json(config_json)
    node = {"num_cpus": 1, "resources": {cfg.pool.node_resource: 1}, "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=cfg.namespace, log_to_driver=False)
    try:
        # one HTTP proxy: a proxy per node would bind the same loopback port twice
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": cfg.port})
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{cfg.port}"
        deadline = time.monotonic() + 150
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("coe did not become ready on the two-node cluster in 150 s")
            time.sleep(0.5)
        pool = serve.get_deployment_handle("ExpertPool", app_name=cfg.app_name)

        def reports() -> dict[str, dict]:
            """Every pool replica's own report (``record_routing_stats``, asked directly, so that
            what the test checks does not depend on the request router under test)."""
            seen: dict[str, dict] = {}
            for _ in range(100):
                rep = pool.record_routing_stats.remote().result(timeout_s=10)
                seen[rep["replica"]] = rep
                if len(seen) == cfg.pool.num_replicas:
                    break
            return seen

        replicas = {r: rep["node"] for r, rep in reports().items()}
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"port": cfg.port, "nodes": nodes, "replicas": replicas}), flush=True)
        for line in sys.stdin:  # "view": every replica's experts and tiers, one JSON line; EOF: stop
            if line.strip() == "view":
                print(json.dumps({r: rep["experts"] for r, rep in reports().items()}), flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
