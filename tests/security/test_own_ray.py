"""Finding 3 of issue 24: ``coe serve`` joined a local user's Ray cluster. ``ray.init`` without an
address connected to the cluster named in ``ray_current_cluster`` of the shared temp dir (which
another user's ``ray start`` had written), and the service's driver ran tasks as that user.
``coe drain`` (``address="auto"``) found clusters the same way.

Replayed with a planted "foreign cluster": a TCP listener that counts connections, named in a
``ray_current_cluster`` file of Ray's default temp dir (``$RAY_TMPDIR/ray``, as another user's
``ray start`` writes it into ``/tmp/ray``), and for ``coe drain`` in ``RAY_ADDRESS`` too.
One Ray head is started for the whole module, in a subprocess, the way ``coe serve`` starts it
(``coe.ray_local.init_local_ray``, dashboard on, then the address file ``coe serve`` writes), with a
``COE_HOME`` too deep for unix-socket paths:

* it never touches the planted cluster, and starts a head of its own;
* its directories are inside a short private directory (0700, ours), linked from
  ``$COE_HOME/ray/tmp``, and the dashboard's sockets fit; a throwaway local user cannot list them or
  replace the dashboard's job-head socket (finding 2's exploit);
* ``coe drain`` joins that head through ``$COE_HOME/ray/address`` (0600) and nothing else; with no
  such file it says that no coe service runs under this ``COE_HOME``, and joins nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, wait_until

from security_helpers import as_user, assert_denied, local_user  # noqa: F401 - local_user is a fixture

pytestmark = pytest.mark.timeout(300)

START_S = 150.0

# what `coe serve` does (coe/cli.py _start_ray, same arguments): init_local_ray, then the address
# file for `coe drain`
CHILD = r"""
import json, logging, sys
from coe.ray_local import init_local_ray
ctx = init_local_ray(include_dashboard=True, dashboard_port=int(sys.argv[1]), num_cpus=None, namespace="coe",
                     log_to_driver=False, logging_level=logging.WARNING)
import ray
from coe.ray_local import write_address_file
node = ray._private.worker._global_node
write_address_file(ctx)
print(json.dumps({"gcs_address": ctx.address_info["gcs_address"], "temp": node.get_temp_dir_path(),
                  "session": node.get_session_dir_path()}), flush=True)
sys.stdin.read()  # until the test closes stdin
ray.shutdown()
"""


class Listener:
    """A "foreign Ray cluster": a loopback TCP port that accepts and counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                self._conns.append(conn)

    def close(self) -> None:
        for c in [*self._conns, self.sock]:
            with contextlib.suppress(OSError):
                c.close()


@dataclass
class Head:
    info: dict | None
    error: str
    foreign: Listener
    home: Path  # the deep COE_HOME
    env: dict[str, str]  # what every process of this module runs with (the planted RAY_TMPDIR)
    planted: Path
    extra: list[Path] = field(default_factory=list)

    def need(self) -> dict:
        assert self.info is not None, f"the head did not start: {self.error[-3000:]}"
        return self.info


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out and out[0].strip() else None


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    foreign = Listener()
    planted = tmp_path_factory.mktemp("shared-tmp")
    (planted / "ray").mkdir()
    (planted / "ray" / "ray_current_cluster").write_text(foreign.address)  # what `ray start` writes
    base = Path(tempfile.mkdtemp(prefix="coe-deep-"))
    home = base / ("deep" * 12) / "home"  # $COE_HOME/ray/tmp is longer than a socket path allows
    env = {**os.environ, "COE_HOME": str(home), "RAY_TMPDIR": str(planted)}
    env.pop("RAY_ADDRESS", None)
    log = base / "child.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(free_port())], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env, text=True)
    line = _read_line(proc, START_S)
    info = json.loads(line) if line else None
    h = Head(info, "" if info else log.read_text(errors="replace"), foreign, home, env, planted)
    try:
        yield h
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            proc.wait(90 if info else 1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        foreign.close()
        if info and Path(info["temp"]).resolve().parent.name.startswith(f"coe-{os.getuid()}-"):
            shutil.rmtree(Path(info["temp"]).resolve().parent, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_serve_starts_its_own_head_and_never_joins_one_it_finds(head):
    assert head.foreign.connections == 0, \
        f"the service's driver connected to the planted cluster {head.foreign.connections} time(s)"
    info = head.need()
    assert info["gcs_address"] != head.foreign.address
    assert info["gcs_address"].startswith("127.0.0.1:")
    # Ray's shared default temp dir was neither used nor written
    assert sorted(p.name for p in (head.planted / "ray").iterdir()) == ["ray_current_cluster"]


def _private(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid(), path
    assert stat.S_IMODE(st.st_mode) == 0o700, f"{path}: {stat.S_IMODE(st.st_mode):o}"


def test_a_deep_coe_home_falls_back_to_a_short_private_dir(head):
    from coe.ray_local import TEMP_DIR_MAX, fallback_root

    info = head.need()
    temp, session = Path(info["temp"]), Path(info["session"])
    short = fallback_root(head.home)
    assert temp == short / "tmp" and len(str(temp)) <= TEMP_DIR_MAX, temp
    link = head.home / "ray" / "tmp"  # the stable path the banner and the docs name
    assert link.is_symlink() and link.resolve() == temp.resolve()
    for d in (head.home / "ray", short):  # the boundaries: everything of Ray's is inside `short`
        _private(d)
    assert session.parent == temp and (session / "sockets").is_dir() and (session / "logs").is_dir()
    # the dashboard's sockets (one per head module) are in the private sockets dir, and fit
    jobs = session / "sockets" / "dash_JobHead"
    wait_until(lambda: jobs.exists(), 60, what="the dashboard's job-head socket")
    assert all(len(str(p).encode()) <= 107 for p in (session / "sockets").iterdir())


def test_a_local_user_cannot_replace_the_dashboards_job_socket(head, local_user):
    from coe.ray_local import fallback_root

    info = head.need()
    session = Path(info["session"])
    jobs = session / "sockets" / "dash_JobHead"
    wait_until(lambda: jobs.exists(), 60, what="the dashboard's job-head socket")
    theirs = Path(tempfile.gettempdir()) / f"{local_user}-sock"
    try:
        assert as_user(local_user, "touch", str(theirs)).returncode == 0
        assert_denied(local_user, "ls", str(fallback_root(head.home)))
        assert_denied(local_user, "ls", str(session / "sockets"))
        assert_denied(local_user, "mv", "-f", str(theirs), str(jobs))
        assert_denied(local_user, "rm", "-f", str(jobs))
        assert stat.S_ISSOCK(os.lstat(jobs).st_mode)
    finally:
        theirs.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ coe drain
def _drain(head: Head, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`coe drain` with the foreign cluster named in RAY_ADDRESS too (Ray's "auto" would take it)."""
    env = {**head.env, "RAY_ADDRESS": head.foreign.address, "COLUMNS": "300", **env}
    return subprocess.run([sys.executable, "-m", "coe.cli", "drain", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_address_file_is_private(head):
    info = head.need()
    f = head.home / "ray" / "address"
    st = f.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
    assert json.loads(f.read_text())["address"] == info["gcs_address"]


def test_drain_joins_only_the_cluster_coe_started(head):
    info = head.need()
    t = time.monotonic()
    out = _drain(head, "--app", "no-such-app", "--timeout", "1")
    text = out.stdout + out.stderr
    assert head.foreign.connections == 0, text
    # it joined coe's head (named in its output) and then found no such app there
    assert info["gcs_address"] in text and "no coe service" not in text, text
    assert out.returncode != 0 and "Traceback" not in text, text
    assert time.monotonic() - t < 90


def test_drain_without_a_coe_service_says_so_and_joins_nothing(head, tmp_path):
    home = Path(tempfile.mkdtemp(prefix="coe-none-"))
    try:
        out = _drain(head, "--app", "coe", "--timeout", "1", COE_HOME=str(home))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    text = out.stdout + out.stderr
    assert head.foreign.connections == 0, text
    assert out.returncode == 2, text
    assert "no coe service runs under" in text and str(home) in text and "Traceback" not in text, text
