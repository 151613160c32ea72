"""`coe serve` refuses cleanly when Redis is down, and warns loudly when bound beyond loopback
without API keys (both checked before anything starts, so these runs are quick)."""

from __future__ import annotations

import os
import subprocess
import sys

DEAD = "redis://127.0.0.1:9/0"  # discard port: nothing answers


def _serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "COE_REDIS_URL": DEAD, "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "coe.cli", "serve", *args], env=e, capture_output=True,
                          text=True, timeout=120)


def test_serve_beyond_loopback_without_keys_warns_loudly(tmp_path):
    out = _serve("--host", "0.0.0.0", "--port", "18999", COE_API_KEYS_FILE=str(tmp_path / "none.json"))
    assert "NO API KEY" in out.stderr and "0.0.0.0" in out.stderr
    # and then fails on the dead Redis with a one-line message naming it, without a traceback
    assert out.returncode != 0
    assert "cannot reach Redis at redis://127.0.0.1:9/0" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def test_serve_on_loopback_or_with_keys_does_not_warn(tmp_path):
    out = _serve("--port", "18999", COE_API_KEYS_FILE=str(tmp_path / "none.json"))
    assert "NO API KEY" not in out.stderr and out.returncode != 0
    out = _serve("--host", "0.0.0.0", "--port", "18999", COE_API_KEYS="k-for-test",
                 COE_API_KEYS_FILE=str(tmp_path / "none.json"))
    assert "NO API KEY" not in out.stderr
    assert "k-for-test" not in out.stdout + out.stderr  # the key itself is never printed
