"""Cost of appendfsync always vs everysec vs no for registry writes (200 adds, 1 client, 3 runs).

Why: the embedded Redis runs with ``appendfsync always`` so that a change the CLI reported as done
survives an OS crash; this measures what that costs per registry write.

Run from the repo root: .venv/bin/python bench/registry_fsync.py [DIR_FOR_REDIS_DATA]
Writes bench/results/registry_fsync.json.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from expert_registry.embedded import write_config, redis_server_binary, ping
from expert_registry.store import RedisRegistry
from expert_registry.spec import Expert
base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir())
res = {}
for mode in ("always", "everysec", "no"):
    runs = []
    for rep in range(3):
        d = Path(tempfile.mkdtemp(prefix="fs-", dir=base))
        conf, url = write_config(d, daemonize=False, appendfsync=mode)
        p = subprocess.Popen([redis_server_binary(), str(conf)])
        while not ping(url): time.sleep(0.02)
        reg = RedisRegistry(url, "bench")
        t = time.perf_counter()
        for i in range(200):
            reg.add(Expert(name=f"e{i}", model="/m.gguf"))
        runs.append((time.perf_counter() - t) / 200 * 1000)
        reg.close(); p.terminate(); p.wait()
    res[mode] = {"ms_per_add_median": round(statistics.median(runs), 3), "runs_ms": [round(r, 3) for r in runs]}
meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(), "cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
        "redis_server": redis_server_binary(), "adds_per_run": 200, "dir": str(base)}
out = {**meta, **res}
Path(__file__).with_name("results").joinpath("registry_fsync.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
