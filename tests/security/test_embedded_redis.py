"""Finding 4 of issue 12: the embedded Redis fell back to TCP with no password (long ``COE_HOME``),
let any client use ``CONFIG SET dir``/``SAVE`` to write files, was an unmaintained 6.2.5 build, and
nothing restarted it when it died.

The exploit needs a second local user, so these tests assert what closes it: a unix socket in a
0700 directory whatever the ``COE_HOME`` length, a password, CONFIG/MODULE/DEBUG gone, a
maintained server build, and a supervisor that restarts a killed server at the same URL (with the
data, and the restart visible in the health record)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import pytest
import redis

from expert_registry import embedded

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def long_home(monkeypatch) -> Path:
    """A private COE_HOME whose socket path would not fit a unix socket address (> 108 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="coe-long-")).resolve()
    home = base / ("a-rather-long-directory-name-" * 4)
    home.mkdir()
    monkeypatch.setenv("COE_HOME", str(home))
    monkeypatch.delenv("COE_REDIS_URL", raising=False)
    yield home
    embedded.stop_embedded()
    shutil.rmtree(base, ignore_errors=True)


def test_long_home_still_gets_a_private_unix_socket_with_a_password(long_home):
    assert len(str(long_home / "redis" / "redis.sock")) > 108
    info = embedded.ensure_embedded()
    assert info.url.startswith("unix://:") and "@/tmp/coe-redis-" in info.url  # never redis://host:port
    sock = Path(info.url.split("@", 1)[1])
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700 and sock.parent.stat().st_uid == os.getuid()
    assert len(str(sock)) <= 100
    for f in ("password", "redis.conf", "server.json"):
        assert stat.S_IMODE((long_home / "redis" / f).stat().st_mode) == 0o600, f
    # no password, no service
    anon = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        anon.ping()
    anon.close()


def test_dangerous_commands_are_disabled_and_the_build_is_maintained(long_home):
    c = redis.Redis.from_url(embedded.ensure_embedded().url, socket_timeout=2)
    try:
        assert c.ping()
        for cmd in (("CONFIG", "SET", "dir", "/etc"), ("CONFIG", "GET", "dir"), ("MODULE", "LIST"),
                    ("DEBUG", "SLEEP", "0")):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                c.execute_command(*cmd)
        info = c.info("server")
        assert "valkey_version" in info or int(str(info["redis_version"]).split(".")[0]) >= 7, info
    finally:
        c.close()


def test_supervisor_restarts_a_killed_server_at_the_same_url(long_home):
    info = embedded.ensure_embedded()
    c = redis.Redis.from_url(info.url, socket_timeout=2)
    c.set("coe:test:kept", "yes")  # appendfsync always: acknowledged = on disk
    c.close()
    restarted = []
    sup = embedded.EmbeddedSupervisor(every_s=0.2, on_restart=restarted.append).start()
    try:
        os.kill(info.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not restarted and time.monotonic() < deadline:
            time.sleep(0.1)
        assert restarted, "the supervisor did not restart the killed server"
        new = restarted[0]
        assert new.url == info.url and new.pid != info.pid and new.restarts == 1
        c = redis.Redis.from_url(info.url, socket_timeout=2)
        assert c.get("coe:test:kept") == b"yes"
        c.close()
        health = embedded.embedded_health(info.url)
        assert health["restarts"] == 1 and health["pid"] == new.pid
    finally:
        sup.stop()
