"""A user's first minutes, in a real terminal: tmux runs `coe serve --demo` (its own embedded Redis,
its own Ray), the test reads the screen from start-up to Ctrl-C, and runs the banner's `coe chat`
command as printed, in a fresh shell.

This module sorts before every test that starts Ray in the pytest process, so the machine never
holds two Ray clusters at once; the demo weights and the trained router come from the test cache
(the first session builds them, as the session fixtures would anyway).
"""

from __future__ import annotations

import os
import re
import shutil
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
    """From the moment the port opens, every answer is JSON: before the app's route is in Ray
    Serve's proxy, its own plain-text 404 is rewritten to a 503 ``starting`` (coe/serve/proxy_errors.py)."""
    assert answers, "the port never answered while starting"
    assert all("json" in a[1] for a in answers), [a for a in answers if "json" not in a[1]][:5]
    assert all(a[0] != 404 for a in answers), [a for a in answers if a[0] == 404][:5]


def test_serve_start_chat_and_ctrl_c_as_a_user_sees_them():
    home, port, dash = _home(), free_port(), free_port()
    coe = Path(sys.executable).with_name("coe")
    command = (f"env COE_HOME={home} HF_HUB_OFFLINE=1 {coe} serve --demo --port {port} --dashboard-port {dash}"
               f" --num-cpus 2; echo EXITED-$?; sleep {START_S + STOP_S}")
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

        term.keys("C-c")
        deadline = time.monotonic() + STOP_S
        while "EXITED-" not in (screen := term.screen()):
            assert time.monotonic() < deadline, screen
            time.sleep(1.0)
        stop = screen[screen.index("Shutting down"):]
        assert "EXITED-0" in stop and "Ray stopped" in stop and "embedded Redis stopped" in stop, stop
        for noise in ("graceful_shutdown", "killed by ray.kill", "Unhandled error", "Traceback"):
            assert noise not in stop, (noise, stop)
        log = home / "logs" / "serve.log"
        assert not log.exists() or "\x1b[" not in log.read_text(errors="replace")
    finally:
        term.keys("C-c")
        time.sleep(2)
        term.close()
        subprocess.run([sys.executable, "-c", "from expert_registry.embedded import stop_embedded; stop_embedded()"],
                       env={"COE_HOME": str(home), "PATH": "/usr/bin:/bin"}, timeout=60, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
