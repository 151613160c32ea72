"""The single-machine Ray that ``coe serve`` (and the test suite) run on, kept to this machine.

Why: a stock local ``ray.init()`` listens on every interface (GCS, raylet, worker, dashboard-agent,
runtime-env-agent and metrics-export ports) and writes its token to ``~/.ray/auth_token`` with the
default umask (0644 in a 0755 directory), so any local user could read it and submit a Ray job that
runs as the service user. Here:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray 2.60 take the loopback address as the node IP
  (its single-machine mode); every Ray process then binds 127.0.0.1 (``ray.init(_node_ip_address=
  "127.0.0.1")`` does not: Ray replaces a loopback node IP with the reachable one). The cost: this
  Ray cannot take other nodes, which the single-machine default never wants. The dashboard binds
  127.0.0.1 explicitly. A cluster is started with ``ray start`` instead (docs/security.md).
* the token file is created before Ray would create it, ``0600`` in a ``0700`` directory, and an
  existing one is tightened to those modes.

Issue 24 (a second local user): Ray's default temp dir ``/tmp/ray`` and every session, socket and
log directory in it are 0777 without a sticky bit (``ray._common.utils.try_make_directory_shared``),
so another user could replace the dashboard's sockets and read the owner's token off its calls; and
``ray.init()`` without an address joins whatever cluster ``$RAY_ADDRESS`` or the shared
``ray_current_cluster`` file names. Here:

* Ray's temp root is ``$COE_HOME/ray/tmp`` (:func:`ray_dirs`) and ``$COE_HOME/ray`` is the
  boundary: 0700 and this user's (one another user made, one writable by group/others, or a symlink
  is refused with :class:`RayDirError`, one line), so nothing below it can be listed, read, created
  or replaced by anyone else, whatever modes Ray gives its own directories (every Ray worker process
  chmods the temp root, session, sockets and logs directories 0777 again when it starts:
  ``ray/_private/node.py`` ``_init_temp``). When ``$COE_HOME/ray/tmp`` is too long for Ray's unix
  sockets (:data:`TEMP_DIR_MAX`), the temp root is ``/tmp/coe-<uid>-<hash>/tmp`` instead, the short
  directory held to the same checks, and ``$COE_HOME/ray/tmp`` links to it, so
  ``$COE_HOME/ray/tmp/session_latest/logs`` is always where the logs are. The umask while
  ``ray.init`` starts the head is 077, which every Ray process inherits: their files are 0600 and
  their sockets 0700.
* :func:`init_local_ray` passes ``address="local"``: always a new head, never one it finds (and
  ``RAY_ADDRESS`` is dropped from the environment its processes inherit). ``coe serve`` joins a
  cluster only when its config names one (``ray_address``).
* ``coe serve`` records the head it uses in ``$COE_HOME/ray/address`` (0600, :func:`write_address_file`)
  and removes it when it stops; ``coe drain`` and the benchmarks join that address and nothing else
  (:func:`read_address_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coe.errors import CoeError
from expert_registry.embedded import pid_alive

LOOPBACK = "127.0.0.1"
#: Ray 2.60: "0" = single-machine mode, the node IP is loopback and every server binds to it
ENV_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ENV_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
ENV_ADDRESS = "RAY_ADDRESS"

#: ``$COE_HOME/ray``: the address file and Ray's temp root (or a link to it)
RAY_DIR = "ray"
TEMP_DIR = "tmp"
ADDRESS_FILE = "address"
#: a unix socket path has at most 107 bytes on Linux (108 with the NUL; Ray checks the same)
SOCKET_PATH_MAX = 107
#: below its temp root Ray 2.60 puts its sockets at ``session_<%Y-%m-%d_%H-%M-%S_%f>_<pid>/sockets/<name>``;
#: a pid has at most 7 digits (pid_max 4194304) and the longest name is ``dash_TaskEventsHead`` (19)
_SESSION_SOCKETS = len("/session_2026-12-06_03-53-58_429270_4194304/sockets/")
_SOCKET_NAME_MAX = 20
#: the longest temp root whose every socket path fits (35 bytes)
TEMP_DIR_MAX = SOCKET_PATH_MAX - _SESSION_SOCKETS - _SOCKET_NAME_MAX
FALLBACK_PARENT = Path("/tmp")


class RayDirError(CoeError):
    """A directory or file Ray or coe would use is not private to this user; nothing was started.
    The message is one line: which path, what is wrong with it, what to do."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


class NoCoeRay(CoeError):
    """No ``coe serve`` runs under this ``COE_HOME`` (no address file, or its process is gone)."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


def _who(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def private_dir(path: Path, create: bool = True) -> Path:
    """``path`` as a directory only this user can enter: created 0700 if missing (its parent must
    exist), else accepted only if it is a real directory (not a symlink) of this user's that group
    and others cannot write; read bits left for them are taken away. :class:`RayDirError` otherwise."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    st = os.lstat(path)
    me = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise RayDirError(f"{path} is a symbolic link (to {os.readlink(path)}), not a directory: Ray's files must "
                          "be in a private directory of this user's; remove the link and start again")
    if not stat.S_ISDIR(st.st_mode):
        raise RayDirError(f"{path} is not a directory; remove it and start again")
    if st.st_uid != me:
        raise RayDirError(f"{path} belongs to {_who(st.st_uid)}, not to this user ({_who(me)}): whoever owns it "
                          "could read or replace Ray's sockets and logs; remove it (as its owner or root) and "
                          "start again, or set COE_HOME elsewhere")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = "group and others" if mode & 0o022 == 0o022 else "its group" if mode & 0o020 else "others"
        raise RayDirError(f"{path} is writable by {who} (mode {mode:04o}), so someone else could have put "
                          "something in it: remove it and start again (or `chmod 700` it if you know what is inside)")
    if mode != 0o700:
        os.chmod(path, 0o700)
    return path


def _own_dir(path: Path) -> Path:
    """A directory inside a private one (:func:`private_dir`): created 0700, or a real directory of
    this user's set back to 0700 (only this user's processes could have changed its mode: Ray does)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise RayDirError(f"{path} is not a directory of this user's; remove it and start again")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _check_home(home: Path) -> None:
    """``COE_HOME`` must not let other users rename our private directory away: it belongs to this
    user or root, and group/others cannot write it (unless it is sticky, like /tmp)."""
    st = os.stat(home)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.getuid(), 0):
        raise RayDirError(f"COE_HOME {home} belongs to {_who(st.st_uid)}: that user could replace Ray's directory "
                          "in it; set COE_HOME to a directory of your own")
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise RayDirError(f"COE_HOME {home} is writable by other users (mode {mode:04o}), who could replace Ray's "
                          f"directory in it: `chmod go-w {home}`, or set COE_HOME elsewhere")


@dataclass(frozen=True)
class RayDirs:
    """Where Ray and coe keep a service's Ray files (:func:`ray_dirs`)."""

    root: Path  # $COE_HOME/ray, 0700: the address file; ``tmp`` (Ray's temp root, or a link to it)
    temp: Path  # Ray's temp root, ray.init(_temp_dir=...): session_*/{sockets,logs,...}, session_latest
    fallback: Path | None  # the short private dir in /tmp holding ``temp`` when root/tmp is too long

    @property
    def address_file(self) -> Path:
        return self.root / ADDRESS_FILE

    @property
    def session_latest(self) -> Path:
        """The latest session, by its stable path ``$COE_HOME/ray/tmp/session_latest`` (through the
        link when the temp root fell back to /tmp)."""
        link = self.root / TEMP_DIR
        with contextlib.suppress(OSError):
            if link.resolve() == self.temp.resolve():
                return link / "session_latest"
        return self.temp / "session_latest"

    @property
    def logs(self) -> Path:
        return self.session_latest / "logs"


def _home(home: Path | str | None) -> Path:
    if home is None:
        from expert_registry.paths import coe_home

        home = coe_home()
    return Path(os.path.abspath(Path(home).expanduser()))


def fallback_root(home: Path | str | None = None) -> Path:
    """The short private directory for a ``COE_HOME`` too deep for socket paths:
    ``/tmp/coe-<uid>-<8 hex of the COE_HOME path>`` (stable, so restarts keep their paths)."""
    tag = hashlib.sha256(str(_home(home) / RAY_DIR).encode()).hexdigest()[:8]
    return FALLBACK_PARENT / f"coe-{os.getuid()}-{tag}"


def ray_root(home: Path | str | None = None) -> Path:
    """``$COE_HOME/ray``, created 0700 or checked private (:func:`private_dir`), in a ``COE_HOME`` that
    other users cannot write."""
    home = _home(home)
    home.mkdir(parents=True, exist_ok=True)
    _check_home(home)
    return private_dir(home / RAY_DIR)


def ray_dirs(home: Path | str | None = None) -> RayDirs:
    """Create (or check) the private directories of this ``COE_HOME``'s Ray and return them:
    ``$COE_HOME/ray`` (0700) and Ray's temp root ``$COE_HOME/ray/tmp`` (0700), or, when that path is
    longer than :data:`TEMP_DIR_MAX`, ``/tmp/coe-<uid>-<hash>/tmp`` (both 0700) with
    ``$COE_HOME/ray/tmp`` a link to it. Raises :class:`RayDirError` (one line) for a directory that
    is not private."""
    home = _home(home)
    root = ray_root(home)
    temp = root / TEMP_DIR
    if len(str(temp).encode()) <= TEMP_DIR_MAX:
        if temp.is_symlink():  # left by a fall-back: inside our private dir, so it is ours
            temp.unlink()
        return RayDirs(root, _own_dir(temp), None)
    short = private_dir(fallback_root(home))
    real = _own_dir(short / TEMP_DIR)
    if temp.is_symlink() or not temp.exists():
        if not (temp.is_symlink() and os.readlink(temp) == str(real)):
            tmp_link = root / f".{TEMP_DIR}.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                tmp_link.unlink()
            tmp_link.symlink_to(real, target_is_directory=True)
            os.replace(tmp_link, temp)
    return RayDirs(root, real, short)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """The process's umask while the head starts: every process Ray starts inherits it."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def check_started(dirs: RayDirs, session_dir: str | Path) -> None:
    """After the start: the boundary is still private and Ray's session is inside it (fail closed)."""
    private_dir(dirs.root, create=False)
    if dirs.fallback is not None:
        private_dir(dirs.fallback, create=False)
    bound = dirs.fallback or dirs.root
    session = Path(os.path.realpath(session_dir))
    if Path(os.path.realpath(bound)) not in session.parents:
        raise RayDirError(f"Ray's session {session} is not inside {bound}; stop and report this")


@dataclass(frozen=True)
class ServiceRay:
    """What ``$COE_HOME/ray/address`` records: the Ray a running ``coe serve`` uses."""

    address: str  # host:port of the GCS (or the config's ray_address as given)
    pid: int  # the coe serve process
    started_head: bool  # coe started this head (single machine, loopback) or joined a configured cluster
    session_dir: str | None = None
    dashboard_url: str | None = None
    started_at: float = 0.0


def address_file(home: Path | str | None = None) -> Path:
    return _home(home) / RAY_DIR / ADDRESS_FILE


def write_address_file(ctx: Any = None, *, address: str | None = None, started_head: bool = True,
                       home: Path | str | None = None) -> Path:
    """Record the Ray this process (``coe serve``) uses, 0600 in ``$COE_HOME/ray`` (written whole,
    then renamed into place). ``address`` defaults to the GCS address of ``ctx`` (``ray.init``'s)."""
    root = ray_root(home)
    info = getattr(ctx, "address_info", None) or {}
    rec = ServiceRay(address=address or info["gcs_address"], pid=os.getpid(), started_head=started_head,
                     session_dir=info.get("session_dir"), dashboard_url=getattr(ctx, "dashboard_url", None) or None,
                     started_at=time.time())
    path = root / ADDRESS_FILE
    tmp = root / f".{ADDRESS_FILE}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(rec.__dict__, f)
    os.replace(tmp, path)
    return path


def read_address_file(home: Path | str | None = None) -> ServiceRay:
    """The Ray of the ``coe serve`` running under this ``COE_HOME``: :class:`NoCoeRay` when there is
    none (no file, or its process is gone), :class:`RayDirError` when the file or its directory is
    not private to this user (then it is not trusted: joining sends Ray's token)."""
    home = _home(home)
    path = home / RAY_DIR / ADDRESS_FILE
    none = f"no coe service runs under COE_HOME={home}"
    if not (home / RAY_DIR).exists():
        raise NoCoeRay(f"{none} (no {path}): start one with `coe serve`, or name a Ray cluster with --address")
    private_dir(home / RAY_DIR, create=False)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NoCoeRay(f"{none} (no {path}): start one with `coe serve`, or name a Ray cluster with --address") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o022:
        # joining sends Ray's token to the address: only a file nobody else could have written counts
        raise RayDirError(f"{path} is not a file only this user can write (mode {stat.S_IMODE(st.st_mode):04o}, "
                          f"{_who(st.st_uid)}): not trusted; remove it (`coe serve` writes it at its start)")
    try:
        rec = ServiceRay(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise RayDirError(f"{path} cannot be read ({type(e).__name__}): remove it") from None
    if not pid_alive(rec.pid):
        raise NoCoeRay(f"{none}: {path} names pid {rec.pid}, which is not running (a `coe serve` that was "
                       "killed); remove the file")
    return rec


def running_service(home: Path | str | None = None) -> ServiceRay | None:
    """The other ``coe serve`` running under this ``COE_HOME``, if any (for ``coe serve``'s start)."""
    try:
        rec = read_address_file(home)
    except NoCoeRay:
        return None
    return rec if rec.pid != os.getpid() else None


def remove_address_file(home: Path | str | None = None) -> None:
    """Remove the address file if this process wrote it (``coe serve`` stopping)."""
    path = address_file(home)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        if json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()


def token_path() -> Path:
    """Where Ray reads its token: ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    env = os.environ.get(ENV_TOKEN_PATH, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".ray" / "auth_token"


def secure_token(path: Path | None = None) -> Path:
    """Make sure Ray's token exists and only this user can read it: the directory 0700, the file
    0600 (created with that mode, never world-readable for a moment). Returns the path."""
    path = path or token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 random bits, hex
    os.chmod(path, 0o600)
    return path


def single_machine_mode() -> None:
    """Ask Ray for its single-machine mode (loopback node IP) in this process and its children."""
    os.environ[ENV_SINGLE_MACHINE] = "0"
    consts = sys.modules.get("ray._private.ray_constants")
    if consts is not None:  # ray was imported before the variable was set: it read the old value
        consts.ENABLE_RAY_CLUSTER = False


def init_local_ray(**kwargs: Any) -> Any:
    """``ray.init`` for a new single-machine Ray head bound to loopback, with a private token file
    and private directories under ``COE_HOME`` (:func:`ray_dirs`). Never joins a running cluster
    (``address="local"``, whatever ``RAY_ADDRESS`` or a ``ray_current_cluster`` file says).

    ``kwargs`` go to ``ray.init`` (``num_cpus``, ``namespace``, ``include_dashboard`` …);
    ``dashboard_host`` is always 127.0.0.1. Raises :class:`RayDirError` before anything starts when a
    directory is not private."""
    dirs = ray_dirs()
    single_machine_mode()
    secure_token()
    # Serve's HTTP proxy answers its own errors (start-up 404, queue-full 429 …) in coe's JSON
    # shape (coe/serve/proxy_errors.py); its processes inherit this environment
    from coe.serve.proxy_errors import CALLBACK, ENV_PROXY_CALLBACK

    os.environ.setdefault(ENV_PROXY_CALLBACK, CALLBACK)
    os.environ.pop(ENV_ADDRESS, None)  # this process's Ray is its own head: none of its processes look elsewhere
    import ray

    kwargs["dashboard_host"] = LOOPBACK
    kwargs["address"] = "local"
    kwargs["_temp_dir"] = str(dirs.temp)
    with _umask(0o077):
        ctx = ray.init(**kwargs)
    try:
        check_started(dirs, ctx.address_info["session_dir"])
    except RayDirError:
        ray.shutdown()
        raise
    secure_token()  # whatever Ray wrote, the modes stay private
    return ctx


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket of a process."""

    ip: str
    port: int
    process: str

    @property
    def loopback(self) -> bool:
        import ipaddress

        ip = ipaddress.ip_address(self.ip)
        mapped = getattr(ip, "ipv4_mapped", None)
        return (mapped or ip).is_loopback


def listeners(pid: int | None = None) -> list[Listener]:
    """Listening TCP sockets of process ``pid`` (default: this one) and all its descendants, i.e.
    of every Ray process a local ``ray.init`` started. For ``coe`` diagnostics and the tests."""
    import psutil

    root = psutil.Process(pid)
    out: set[Listener] = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.add(Listener(c.laddr.ip, c.laddr.port, p.name()))
        except psutil.Error:
            continue
    return sorted(out, key=lambda x: (x.process, x.port))
