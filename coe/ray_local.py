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
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
#: Ray 2.60: "0" = single-machine mode, the node IP is loopback and every server binds to it
ENV_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ENV_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"


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
    """``ray.init`` for a new single-machine Ray bound to loopback, with a private token file.

    ``kwargs`` go to ``ray.init`` (``num_cpus``, ``namespace``, ``include_dashboard`` …);
    ``dashboard_host`` is always 127.0.0.1."""
    single_machine_mode()
    secure_token()
    # Serve's HTTP proxy answers its own errors (start-up 404, queue-full 429 …) in coe's JSON
    # shape (coe/serve/proxy_errors.py); its processes inherit this environment
    from coe.serve.proxy_errors import CALLBACK, ENV_PROXY_CALLBACK

    os.environ.setdefault(ENV_PROXY_CALLBACK, CALLBACK)
    import ray

    kwargs["dashboard_host"] = LOOPBACK
    ctx = ray.init(**kwargs)
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
