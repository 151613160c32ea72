"""Small helpers shared by the security replays (most run against the session's real service), and a
throwaway second local user for the replays that need one (import the ``local_user`` fixture)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import wait_until

HELLO = [{"role": "user", "content": "What is 2+2?"}]


def err(r: httpx.Response) -> dict:
    """The OpenAI error object of a response (and a check that it has exactly that shape)."""
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


wait = wait_until


# --- a second local user (issue 24: Ray's files and cluster against another account on the machine) ---

@pytest.fixture(scope="module")
def local_user() -> Iterator[str]:
    """A throwaway unprivileged account (``useradd``; removed afterwards). CI runs as root; a run
    that is not root, or a machine without ``useradd``/``runuser``, skips the tests that need one."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to create a throwaway local user")
    if not (shutil.which("useradd") and shutil.which("userdel") and shutil.which("runuser")):
        pytest.skip("needs useradd, userdel and runuser")
    name = f"coe-probe-{uuid.uuid4().hex[:6]}"
    res = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name],
                         capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        pytest.skip(f"useradd failed: {res.stderr.strip()}")
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["userdel", name], capture_output=True, timeout=30)


def as_user(user: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``cmd`` run as ``user`` (no shell, a clean environment)."""
    return subprocess.run(["runuser", "-u", user, "--", "env", "-i", "PATH=/usr/bin:/bin", *cmd],
                          capture_output=True, text=True, timeout=timeout)


def assert_denied(user: str, *cmd: str) -> None:
    """``cmd`` as ``user`` fails with EACCES/EPERM (and not for some other reason)."""
    res = as_user(user, *cmd)
    assert res.returncode != 0, f"{user} could run {cmd}: {res.stdout[-500:]}"
    assert "Permission denied" in res.stderr or "Operation not permitted" in res.stderr, (cmd, res.stderr)
