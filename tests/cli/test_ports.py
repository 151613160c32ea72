"""Issue 31 item 1: a port another program holds stops `coe serve` at once, in one line naming
coe's own option (never Ray's advice, 26 s into a cold start), before Redis or Ray start; and
`make serve ARGS="..."` passes options through. (That a taken default dashboard port gives way to
a free one, named in the banner, is checked on a real start in tests/cli/test_terminal.py.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import REPO, free_port

COE = str(Path(sys.executable).with_name("coe"))
QUICK_S = 20.0  # "at once": no Redis, no weights, no Ray (the command itself takes ~0.5 s)


def _hold(stack: ExitStack) -> int:
    """A port some other program listens on (a plain socket), held until ``stack`` closes."""
    s = stack.enter_context(socket.socket())
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s.getsockname()[1]


def _serve(home: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    res = subprocess.run([COE, "serve", "--demo", *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COE_HOME": str(home), "COLUMNS": "80"})
    return res, time.monotonic() - t


@pytest.fixture
def home() -> Path:
    h = Path(tempfile.mkdtemp(prefix="coe-ports-"))
    yield h
    shutil.rmtree(h, ignore_errors=True)


def _started_nothing(home: Path) -> None:
    assert not (home / "redis").exists(), "the embedded Redis was started"
    assert not (home / "models").exists(), "the demo weights were prepared"
    assert not list((home / "ray").glob("**/session_*")), "Ray was started"


def test_a_taken_api_port_fails_at_once_naming_coe_serve_port(home):
    with ExitStack() as stack:
        port = _hold(stack)
        res, took = _serve(home, "--port", str(port))
    assert res.returncode == 2 and took < QUICK_S, (res.returncode, took, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # one line, even in 80 columns
    line = lines[0]
    assert line.startswith("error: ") and f"port {port} of coe's API" in line and "in use" in line, line
    assert "`coe serve --port " in line and 'make serve ARGS="--port ' in line, line
    assert "ray start" not in line and "Traceback" not in res.stderr
    # it suggests another port (whether that one is still free a moment later depends on the rest of
    # the machine: with two suites at once it once was not; the choice itself is checked below)
    suggested = int(line.split("`coe serve --port ")[1].split("`")[0])
    assert suggested != port and 0 < suggested < 65536
    _started_nothing(home)


def test_the_suggested_port_skips_ports_that_are_held():
    from coe.cli import _free_port_near

    with ExitStack() as stack:
        first = _hold(stack)
        held = {first}
        for p in (first + 1, first + 2):  # hold the next two as well, where they are free
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", p))
            except OSError:  # another program holds it: held all the same
                pass
            else:
                s.listen()
            held.add(p)
        assert _free_port_near("127.0.0.1", first, 10, set()) not in held


def test_a_taken_dashboard_port_asked_for_fails_at_once_naming_the_option(home):
    with ExitStack() as stack:
        dash = _hold(stack)
        res, took = _serve(home, "--port", str(free_port()), "--dashboard-port", str(dash))
    assert res.returncode == 2 and took < QUICK_S, (res.returncode, took, res.stdout, res.stderr)
    line = res.stderr.strip()
    assert "\n" not in line and f"port {dash} of Ray's dashboard" in line, line
    assert "`coe serve --dashboard-port " in line and "leave the option out" in line and "ray start" not in line, line
    _started_nothing(home)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_serve_passes_args_through():
    res = subprocess.run(["make", "-n", "-C", str(REPO), "serve", 'ARGS=--port 8001 --dashboard-port 8266'],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.endswith("coe serve --demo --port 8001 --dashboard-port 8266") for line in lines), res.stdout
