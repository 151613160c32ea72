"""Two real processes writing at once: WATCH/MULTI keeps every write whole and counted."""

from __future__ import annotations

import time

from expert_registry.store import RedisRegistry

from .helpers import popen_py

WRITER = """
import time
from expert_registry.spec import Expert
from expert_registry.store import RedisRegistry
url, ns, tag = {url!r}, {ns!r}, {tag!r}
reg = RedisRegistry(url, ns)
r = reg._r
r.incr(ns + ":ready")
while not r.get(ns + ":go"):   # start both writers together
    time.sleep(0.005)
for i in range(100):
    reg.add(Expert(name=f"{{tag}}-{{i:03d}}", model="/m.gguf", capabilities={{"coding": i / 100}}))
print("done")
"""


def test_two_processes_add_100_each(registry: RedisRegistry):
    ns = registry.namespace
    sub = registry.subscribe()
    procs = [popen_py(WRITER.format(url=registry.url, ns=ns, tag=tag)) for tag in ("p1", "p2")]
    r = registry._r
    try:
        deadline = time.monotonic() + 60
        while int(r.get(ns + ":ready") or 0) < 2:
            assert time.monotonic() < deadline, "writers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        r.set(ns + ":go", "1")
        events, snapshots = [], 0
        while len(events) < 200 and time.monotonic() < deadline:
            ev = sub.get(timeout=0.05)
            if ev is not None:
                events.append(ev)
            # reads are consistent while writers race: only adds happen, so count == version
            snap = registry.snapshot()
            assert len(snap.experts) == snap.version
            snapshots += 1
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
    finally:
        sub.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
        r.delete(ns + ":ready", ns + ":go")
    assert len(registry.list()) == 200
    assert registry.version() == 200
    assert len(events) == 200
    assert sorted(e.version for e in events) == list(range(1, 201))
    assert sorted(e.name for e in events) == sorted(f"{t}-{i:03d}" for t in ("p1", "p2") for i in range(100))
    assert snapshots > 0
