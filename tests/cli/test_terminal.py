"""A user's first minutes, in a real terminal: tmux runs `coe serve --demo` (its own embedded Redis,
its own Ray), the test reads the screen from start-up to Ctrl-C, and runs the banner's `coe chat`
command as printed, in a fresh shell.

Issue 31 on the same start: another program holds Ray's default dashboard port 8265, so the
dashboard goes on a free port that the screen names; `/healthz` (liveness) answers 200 from the
moment the port opens; `$COE_HOME/logs/serve.log`, which the banner names, is there while coe
serves; and once a key is added with `coe keys add`, `coe chat` without a key says "missing API
key", and with `COE_API_KEY` it answers.

This module sorts before every test that starts Ray in the pytest process, so the machine never
holds two Ray clusters at once; the demo weights and the trained router come from the test cache
(the first session builds them, as the session fixtures would anyway).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")]

START_S = 420  # first session: GGUF conversion + router training + Ray + deploy + warm-up on 2 cores
STOP_S = 90


class Terminal:
    """One tmux session on a private tmux server, 100 columns wide."""

    def __init__(self, command: str):
        self.sock = f"coe-test-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "50", command)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, timeout=30).stdout

    def screen(self) -> str:
        """Everything shown so far, scroll-back included, lines joined where tmux wrapped them."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", "t")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def close(self) -> None:
        self._tmux("kill-server")


def _home() -> Path:
    """A fresh COE_HOME (short: the Redis socket lives in it) reusing the session's cached demo
    weights and router (symlinks into the test cache, see tests/conftest.py)."""
    home = Path(tempfile.mkdtemp(prefix="coe-tty-"))
    session = Path(os.environ["COE_HOME"])
    for sub in ("models", "router"):
        (home / sub).symlink_to((session / sub).resolve(), target_is_directory=True)
    return home


def _assert_json_while_starting(answers: list[tuple[int, str, str]]) -> None:
    """From the moment the port opens, every answer of ``/healthz`` is JSON and 200 (liveness does
    not fail during a normal start, issue 31): before the app's route is in Ray Serve's proxy, its
    own plain-text 404 is rewritten to 200 ``starting`` (coe/serve/proxy_errors.py)."""
    assert answers, "the port never answered while starting"
    assert all("json" in a[1] for a in answers), [a for a in answers if "json" not in a[1]][:5]
    assert all(a[0] == 200 for a in answers), [a for a in answers if a[0] != 200][:5]
    statuses = {(re.search(r'"status":\s*"(\w+)"', a[2]) or [None, None])[1] for a in answers}
    assert statuses <= {"starting", "ok", "degraded"}, (statuses, answers[:5])


def _hold_default_dashboard_port() -> socket.socket | None:
    """Another program on Ray's default dashboard port (None when one already holds it)."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 8265))
        s.listen()
        return s
    except OSError:
        s.close()
        return None


def _assert_dashboard_moved(screen: str) -> None:
    """8265 was taken: the dashboard is on another port, said at once and in the banner, and serves."""
    assert "! Ray's dashboard port 8265 is in use" in screen, screen
    m = re.search(r"dashboard\s+http://127\.0\.0\.1:(\d+)\s+\(Ray token auth is on; 8265 was in use\)", screen)
    assert m and int(m.group(1)) != 8265, screen
    assert httpx.get(f"http://127.0.0.1:{m.group(1)}/", timeout=10).status_code == 200


def _assert_serve_log_while_serving(home: Path, screen: str) -> None:
    """The log the banner names exists while coe serves (not only after a shutdown)."""
    log = home / "logs" / "serve.log"
    assert re.search(rf"logs\s+{re.escape(str(log))}", screen), screen
    text = log.read_text(errors="replace")
    assert "coe serve (pid" in text and "starting" in text and "\x1b[" not in text, text


def _chat_with_keys_on(home: Path, port: int, coe: Path) -> None:
    """`coe keys add` turns keys on in the running service; `coe chat` without a key then says
    "missing API key" (none was sent), and with COE_API_KEY it answers."""
    env = {**os.environ, "COE_HOME": str(home), "COLUMNS": "200"}
    out = subprocess.run([str(coe), "keys", "add", "tty-test"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = re.search(r"coe-[A-Za-z0-9_-]{40,}", out.stdout).group(0)
    deadline = time.monotonic() + 30
    while httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code != 401:
        assert time.monotonic() < deadline, "keys did not switch on"
        time.sleep(0.5)
    fresh = ["env", "-i", "HOME=/tmp", "PATH=/usr/bin:/bin", "COLUMNS=200"]
    chat = [str(coe), "chat", "--url", f"http://127.0.0.1:{port}/v1", "--max-tokens", "4", "Hello!"]
    res = subprocess.run([*fresh, *chat], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "missing API key: pass --api-key or set COE_API_KEY" in res.stderr, res.stderr
    res = subprocess.run([*fresh, f"COE_API_KEY={key}", *chat], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "→ expert" in res.stdout, (res.stdout, res.stderr)


def test_serve_start_chat_and_ctrl_c_as_a_user_sees_them():
    home, port = _home(), free_port()
    coe = Path(sys.executable).with_name("coe")
    command = (f"env COE_HOME={home} HF_HUB_OFFLINE=1 {coe} serve --demo --port {port}"
               f" --num-cpus 2; echo EXITED-$?; sleep {START_S + STOP_S}")
    other = _hold_default_dashboard_port()  # no --dashboard-port: coe must find a free one
    term = Terminal(command)
    answers: list[tuple[int, str, str]] = []  # what the port said during start-up
    try:
        deadline = time.monotonic() + START_S
        while "coe is serving" not in (screen := term.screen()):
            assert "EXITED-" not in screen and time.monotonic() < deadline, screen
            for _ in range(4):  # 4 polls a second: a short window of plain-text answers would show
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                    answers.append((r.status_code, r.headers.get("content-type", ""), r.text[:200]))
                except httpx.HTTPError:
                    pass  # not listening yet
                time.sleep(0.25)
        # ready means warm: /readyz agrees with the banner
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        # start-up printed only what a user needs, and nothing invites turning auth off
        for noise in ("RAY_AUTH_MODE", "disabled to opt out", "Started a local Ray instance", "Traceback", "\x1b["):
            assert noise not in screen, (noise, screen)
        _assert_json_while_starting(answers)
        _assert_dashboard_moved(screen)
        _assert_serve_log_while_serving(home, screen)
        # the banner names Ray's logs inside this COE_HOME (issue 24: not the shared /tmp/ray)
        m = re.search(r"replicas:\s+(\S+)", screen)
        assert m and m.group(1).startswith(f"{home}/ray/tmp/session_latest/logs"), screen
        assert Path(m.group(1)).is_dir() and "/tmp/ray/" not in screen, m.group(1)
        # the banner's command works as printed, in a fresh shell (no venv on PATH, no COE_* vars)
        m = re.search(r"try\s+(.+ chat .*\"Hello!\")", screen)
        assert m, screen
        chat = subprocess.run(["env", "-i", "HOME=/tmp", "PATH=/usr/bin:/bin", "bash", "--norc", "-c", m.group(1)],
                              capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0 and "→ expert smollm2" in chat.stdout, (m.group(1), chat.stdout, chat.stderr)
        _chat_with_keys_on(home, port, coe)

        term.keys("C-c")
        deadline = time.monotonic() + STOP_S
        while "EXITED-" not in (screen := term.screen()):
            assert time.monotonic() < deadline, screen
            time.sleep(1.0)
        stop = screen[screen.index("Shutting down"):]
        assert "EXITED-0" in stop and "Ray stopped" in stop and "embedded Redis stopped" in stop, stop
        for noise in ("graceful_shutdown", "killed by ray.kill", "Unhandled error", "Traceback"):
            assert noise not in stop, (noise, stop)
        log = (home / "logs" / "serve.log").read_text(errors="replace")
        assert "\x1b[" not in log and "stopped: Serve stopped, Ray stopped, embedded Redis stopped" in log, log
    finally:
        if other is not None:
            other.close()
        term.keys("C-c")
        time.sleep(2)
        term.close()
        subprocess.run([sys.executable, "-c", "from expert_registry.embedded import stop_embedded; stop_embedded()"],
                       env={"COE_HOME": str(home), "PATH": "/usr/bin:/bin"}, timeout=60, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
