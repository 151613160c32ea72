"""The embedded redis-server: started on demand, reused by other processes, never started twice,
and the registry survives a clean restart and a kill -9."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from expert_registry import embedded
from expert_registry.spec import Expert
from expert_registry.store import RedisRegistry

from .helpers import popen_py, run_py


def _servers_for(home: Path) -> list[int]:
    """pids of live redis-server processes serving this COE_HOME (socket path in their title)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if ("redis-server" in cmd or "valkey-server" in cmd) and str(home) in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def _wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while embedded.pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


@pytest.fixture
def home(monkeypatch) -> Path:
    """A private COE_HOME (short path: the unix socket lives in it); its server stopped after."""
    path = Path(tempfile.mkdtemp(prefix="coe-emb-")).resolve()
    monkeypatch.setenv("COE_HOME", str(path))
    monkeypatch.delenv("COE_REDIS_URL", raising=False)
    yield path
    embedded.stop_embedded()
    for pid in _servers_for(path):  # a failed test must not leave a server behind
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def test_resolution_order(home, monkeypatch):
    assert embedded.resolve_redis_url("redis://explicit:1") == "redis://explicit:1"
    monkeypatch.setenv("COE_REDIS_URL", "redis://from-env:2")
    assert embedded.resolve_redis_url() == "redis://from-env:2"
    assert embedded.embedded_status() is None  # neither started anything


def test_started_once_reused_by_other_processes(home):
    code = ("from expert_registry.embedded import resolve_redis_url, embedded_status;"
            "u = resolve_redis_url(); print(u, embedded_status().pid)")
    # two processes racing to start it: the file lock lets exactly one start a server
    procs = [popen_py(code) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    (url1, pid1), (url2, pid2) = (o[0].split() for o in outs)
    assert (url1, pid1) == (url2, pid2)
    assert _servers_for(home) == [int(pid1)]
    # this process and a third one reuse it too
    assert embedded.resolve_redis_url() == url1
    res = run_py(code)
    assert res.stdout.split() == [url1, pid1], res.stderr
    info = json.loads((home / "redis" / "server.json").read_text())
    assert info["pid"] == int(pid1) and info["url"] == url1
    assert url1.startswith("unix://") and oct((home / "redis" / "redis.sock").stat().st_mode & 0o777) == "0o700"


def test_survives_restart_and_kill_9(home):
    url = embedded.resolve_redis_url()
    reg = RedisRegistry(url, "persist")
    reg.add(Expert(name="a", model="/m/a.gguf", capabilities={"coding": 0.7}))
    reg.set_map({"coding": ["a"]})
    before = reg.snapshot()
    reg.close()

    listener = RedisRegistry(url, "persist").subscribe()  # must ride out the restart
    received: queue.Queue = queue.Queue()
    thread = threading.Thread(target=lambda: [received.put(ev) for ev in listener], daemon=True)
    thread.start()

    assert embedded.stop_embedded() is True
    assert embedded.embedded_status() is None and _servers_for(home) == []
    reg = RedisRegistry(embedded.resolve_redis_url(), "persist")
    assert reg.snapshot() == before

    reg.add(Expert(name="b", model="/m/b.gguf"))  # acknowledged => fsynced (appendfsync always)
    after_b = reg.snapshot()
    # the subscriber reconnected by itself; it may miss events while Redis was down, so keep
    # adding until one arrives (its version tells the consumer whether to re-read the snapshot)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            ev = received.get(timeout=1)
            break
        except queue.Empty:
            reg.set_status("b", "failed" if reg.get("b").status == "ready" else "ready")
    else:
        pytest.fail("subscriber did not reconnect after the restart")
    listener.close()
    thread.join(5)
    assert ev.name == "b" and ev.version >= 3
    reg.set_status("b", "ready")
    after_b = reg.snapshot()
    reg.close()
    pid = embedded.embedded_status().pid
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)
    assert (home / "redis" / "server.json").exists()  # stale record left behind by the kill
    url2 = embedded.resolve_redis_url()  # detects the dead server, starts a new one
    new_pid = embedded.embedded_status().pid
    assert new_pid != pid and _servers_for(home) == [new_pid]
    reg = RedisRegistry(url2, "persist")
    assert reg.snapshot() == after_b
    assert reg.version() == after_b.version
    reg.close()


def test_stale_record_of_another_process(home):
    """server.json pointing at a pid that is alive but is not redis (pid reuse) is ignored."""
    data = home / "redis"
    data.mkdir(parents=True, exist_ok=True)
    (data / "server.json").write_text(json.dumps({
        "url": f"unix://{data}/redis.sock", "pid": os.getpid(), "data_dir": str(data),
        "binary": "redis-server", "started_at": 0.0}))
    url = embedded.resolve_redis_url()
    assert embedded.ping(url)
    assert embedded.embedded_status().pid != os.getpid()
