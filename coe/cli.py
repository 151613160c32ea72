"""The ``coe`` command: ``coe serve``, ``coe chat``, ``coe router …`` (from ``routers.cli``) and ``coe keys …`` (from ``coe.keys_cli``)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from coe.keys_cli import app as keys_app
from routers.cli import app as router_app

app = typer.Typer(
    name="coe",
    help="coe: one OpenAI-compatible endpoint in front of many expert LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(router_app, name="router", help="Train, explain and evaluate the two-stage router.")
app.add_typer(keys_app, name="keys", help="Create, list and revoke API keys (stored hashed).")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DASHBOARD_HOST = "127.0.0.1"
DASHBOARD_PORT = 8265
#: when the default dashboard port is taken, the next ones tried (Ray's own search, with no port given)
DASHBOARD_PORT_TRIES = 50
CHAT_DEFAULT_URL = "http://127.0.0.1:8000/v1"


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (coe or Ray serve_config format)."),
    host: Optional[str] = typer.Option(None, help="Bind address of the HTTP API (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port of the HTTP API (default 8000)."),
    demo: Optional[bool] = typer.Option(None, "--demo/--no-demo", help="Register the demo experts (SmolLM2) if missing."),
    dashboard_port: Optional[int] = typer.Option(
        None, help=f"Port of Ray's dashboard (bound to 127.0.0.1). Default {DASHBOARD_PORT}, or a free port "
                   f"near it when another program holds {DASHBOARD_PORT} (the banner names it)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs Ray may use (default: all)."),
) -> None:
    """Start Redis (embedded unless COE_REDIS_URL), a local Ray and the coe app; Ctrl-C stops all of it."""
    # quiet third-party progress bars (GGUF conversion, weight loading); rich shows progress instead.
    # Set before transformers/tqdm are imported; Ray workers inherit it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _quiet_ray()  # before anything imports ray: it reads RAY_AUTH_MODE once, at import
    from coe.config import ServeConfig

    try:
        cfg = ServeConfig.from_yaml(config) if config else ServeConfig()
    except Exception as e:  # pydantic / yaml errors as one line
        _fail(f"{config}: {' '.join(str(e).split())}")
    upd = {k: v for k, v in {"host": host, "port": port, "demo": demo}.items() if v is not None}
    cfg = cfg.model_copy(update=upd).with_env()
    ray_dirs = _check_ray_dirs(cfg)  # before anything starts: Ray's directories are private, no other coe serve
    dashboard_port, dashboard_note = _check_ports(cfg, dashboard_port)  # and every port coe asks for is free
    from coe.keys import KeyRing, RedisKeyStore
    from coe.security import check_bind, install_log_redaction

    install_log_redaction()
    # keys live in the registry's Redis (coe keys …); before it is up only a given URL can be read:
    # the environment's keys plus whatever that store holds (an unreadable store shows as none here)
    keys = KeyRing(RedisKeyStore(cfg.redis_url, cfg.namespace, socket_timeout=1.0) if cfg.redis_url else None)
    n_keys = len(keys.records)
    warning = check_bind(cfg.host, n_keys > 0)
    if warning:
        err_console.print(f"[bold white on red] {warning} [/]")
    console.print(f"[dim]API keys: {'on (' + str(n_keys) + ' key(s))' if n_keys else 'off'}; "
                  f"binding {cfg.host}:{cfg.port}[/]")
    stop = threading.Event()

    def _on_signal(signum, _frame):
        if stop.is_set():  # second Ctrl-C: give up waiting
            raise KeyboardInterrupt
        stop.set()

    def _install_handlers() -> None:
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)

    _install_handlers()

    started: dict = {"redis": False, "ray": False, "serve": False, "ray_dirs": ray_dirs,
                     "dashboard_note": dashboard_note}
    _serve_log(f"coe serve (pid {os.getpid()}) starting: API {cfg.host}:{cfg.port}, "
               + (f"Ray at {cfg.ray_address}" if cfg.ray_address else f"dashboard {DASHBOARD_HOST}:{dashboard_port}")
               + "; Ray's own notices while it starts and stops follow")
    try:
        _start_all(cfg, started, dashboard_port, num_cpus, stop, _install_handlers)
        if not stop.is_set():
            console.print("[dim]Ctrl-C stops the service, Ray and (if coe started it) the embedded Redis.[/]")
        while not stop.is_set():
            stop.wait(1.0)
    except KeyboardInterrupt:
        pass
    except typer.Exit:
        _shutdown(started)
        raise
    except Exception as e:
        err_console.print(f"[bold red]error:[/] {type(e).__name__}: {' '.join(str(e).split())}")
        _shutdown(started)
        raise typer.Exit(1)
    _shutdown(started)


def _start_all(cfg, started: dict, dashboard_port: int, num_cpus: int | None, stop: threading.Event,
               reinstall_handlers) -> None:
    """Each stage prints one line when done; a Ctrl-C between stages stops before the next."""
    t_all = time.perf_counter()
    with console.status("[bold]Starting Redis…") as status:
        cfg, registry = _start_redis(cfg, started)
        stages = [
            lambda: _prepare_demo(registry, status) if cfg.demo else None,
            lambda: _load_router(cfg, registry, status),
            lambda: _start_ray(cfg, started, dashboard_port, num_cpus, reinstall_handlers, status),
            lambda: _deploy(cfg, started, status),
            lambda: _wait_ready(cfg, stop, status),
        ]
        for stage in stages:
            if stop.is_set():
                return
            stage()
    if not stop.is_set():
        _print_banner(cfg, len(registry.list()), time.perf_counter() - t_all, dashboard_port, started)


def _start_redis(cfg, started: dict):
    """The registry's Redis: COE_REDIS_URL / config, else the embedded one (started if needed)."""
    from expert_registry.embedded import embedded_status, ensure_embedded, mask_url
    from expert_registry.store import RedisRegistry

    if cfg.redis_url:
        url = cfg.redis_url
        where = f"Redis at {mask_url(url)} (COE_REDIS_URL / config)"
    else:
        was_running = embedded_status() is not None
        url = ensure_embedded().url
        started["redis"] = not was_running
        from expert_registry.embedded import EmbeddedSupervisor

        # restarted at the same URL if it dies; /healthz shows the restart count
        started["redis_supervisor"] = EmbeddedSupervisor(on_restart=lambda i: err_console.print(
            f"[yellow]![/] the embedded Redis had died; restarted (pid {i.pid}, restart #{i.restarts})")).start()
        where = f"embedded Redis at {mask_url(url)} ({'reused' if was_running else 'started'})"
    cfg = cfg.model_copy(update={"redis_url": url})
    registry = RedisRegistry(url, namespace=cfg.namespace)
    try:
        registry.ping()
    except Exception as e:
        _fail(str(e))
    console.print(f"[green]✓[/] {where}")
    return cfg, registry


def _prepare_demo(registry, status) -> None:
    from coe.demo import ensure_demo, prepare_demo_weights

    status.update("[bold]Registering demo experts…")
    added = ensure_demo(registry)
    console.print(f"[green]✓[/] demo experts: {', '.join(added) if added else 'already registered'}",
                  soft_wrap=True)
    status.update("[bold]Converting the SmolLM2 GGUF (first start only, ~40 s on 2 cores)…")
    t = time.perf_counter()
    folder = prepare_demo_weights()
    console.print(f"[green]✓[/] demo weights ready in {time.perf_counter() - t:.1f} s ({folder})", soft_wrap=True)


def _load_router(cfg, registry, status) -> None:
    """Load (on a first start: train) the router here, once, so replicas find it cached."""
    if not registry.list():
        console.print("[yellow]![/] the registry is empty: add experts with `coe-registry add`, "
                      "or start with --demo", soft_wrap=True)
    status.update("[bold]Loading the router (trains on first start)…")
    t = time.perf_counter()
    from coe.serve.router_deployment import load_router

    router = load_router(cfg.router.path)
    console.print(f"[green]✓[/] router ready in {time.perf_counter() - t:.1f} s "
                  f"({len(router.categories)} categories)")


def _quiet_ray() -> None:
    """Environment that keeps Ray's own notices off the user's screen. Token auth is asked for
    explicitly, so Ray does not print an invitation to turn it off (RAY_AUTH_MODE=disabled).
    Must run before ``import ray`` (the router stage imports it)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # workers inherit it: nothing downloads at run time


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _serve_log_path() -> Path:
    from expert_registry.paths import state_dir

    return state_dir("logs") / "serve.log"


def _serve_log(line: str) -> None:
    """One dated line in ``$COE_HOME/logs/serve.log`` (appended, on disk when this returns): the
    file the banner names exists from the start of the run, not only after a shutdown."""
    with _serve_log_path().open("a", encoding="utf-8") as f:
        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")


class _LogCopier(threading.Thread):
    """Copies what lands in a capture file to serve.log while the capture runs (every 0.2 s, whole
    lines, ANSI codes stripped), so the log is current while coe starts or stops."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="coe-serve-log", daemon=True)
        self.fd, self.pos, self.rest = fd, 0, b""
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.copy()

    def copy(self, final: bool = False) -> None:
        while chunk := os.pread(self.fd, 1 << 20, self.pos):
            self.pos += len(chunk)
            self.rest += chunk
        cut = len(self.rest) if final else self.rest.rfind(b"\n") + 1
        data, self.rest = self.rest[:cut], self.rest[cut:]
        text = _ANSI.sub("", data.decode(errors="replace"))
        if text.strip():
            with _serve_log_path().open("a", encoding="utf-8") as f:
                f.write(text if text.endswith("\n") else text + "\n")

    def finish(self) -> None:
        self.done.set()
        self.join()
        self.copy(final=True)


@contextlib.contextmanager
def _ray_output_to_log(fds: tuple[int, ...] = (2,)) -> Iterator[None]:
    """Send what Ray prints on this process's stderr (and stdout, when given) while it starts or
    stops (its banner, the raylet's report of the controller it kills itself at shutdown) to
    ``$COE_HOME/logs/serve.log``, without ANSI codes, as it comes; the banner names the file.
    Replica logs stay in Ray's own log folder. Start-up keeps stdout: rich's spinner draws there.
    The output goes to a temporary file first (never a pipe: a Ray process that inherited the
    descriptor must never block on it or die of SIGPIPE), which a thread copies to the log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    with tempfile.TemporaryFile() as tmp:
        copier = _LogCopier(tmp.fileno())
        for fd in fds:
            os.dup2(tmp.fileno(), fd)
        copier.start()
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            copier.finish()


def _check_ray_dirs(cfg):
    """Issue 24: Ray's directories (temp, sessions, sockets, logs) private to this user under
    COE_HOME, and no other `coe serve` recorded under it (its address file would be overwritten)."""
    from coe.ray_local import RayDirError, ray_dirs, ray_root, running_service

    try:
        if cfg.ray_address:  # a configured cluster keeps its own temp dir: only the address file is ours
            dirs = None
            ray_root()
        else:
            dirs = ray_dirs()
        other = running_service()
    except RayDirError as e:
        _fail(str(e))
    if other is not None:
        _fail(f"another `coe serve` (pid {other.pid}) runs under this COE_HOME, on the Ray at {other.address}: "
              "stop it first, or give this one another COE_HOME")
    return dirs


def _bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not bind ``host:port`` now (None: it could). The probe sets SO_REUSEADDR
    as Ray's servers do (a port left in TIME_WAIT is free) but not SO_REUSEPORT, so a port another
    program listens on counts as taken even when that program set SO_REUSEPORT (Serve's proxy
    would share it with it, and the kernel would split coe's requests between the two)."""
    host = host or "0.0.0.0"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None


def _holder(port: int) -> str:
    """`` (held by pid N, NAME)`` for the process listening on ``port``, when this user may see it."""
    try:
        import psutil

        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return f" (held by pid {c.pid}, {psutil.Process(c.pid).name()})"
    except Exception:  # noqa: BLE001 - only a hint: other users' sockets have no pid here
        pass
    return ""


def _free_port_near(host: str, start: int, tries: int, avoid: set[int]) -> int:
    """The first port from ``start`` on that ``host`` can bind, else one the kernel picks."""
    for port in range(start, min(start + tries, 65536)):
        if port not in avoid and _bind_error(host, port) is None:
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _kernel_port(host: str, avoid: set[int]) -> int:
    """A free port the kernel chooses (never one of ``avoid``)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def _check_ports(cfg, dashboard_port: int | None) -> tuple[int, str | None]:
    """Issue 31: every fixed TCP port coe asks for is checked before anything starts, so a taken
    port costs a second, not a cold start. They are the API (Serve's proxy, ``--port``) and Ray's
    dashboard (``--dashboard-port``); Redis is on a unix socket, and a fresh local Ray head picks
    its GCS, raylet, agent and worker ports itself (Ray's dashboard agent keeps its default 52365
    and, when that is taken, runs without its HTTP server, which coe does not use). Returns the
    dashboard port to use and, when the default was taken, a note for the banner. A cluster named
    by ``ray_address`` owns its ports: nothing is checked then."""
    if cfg.ray_address:
        return dashboard_port or DASHBOARD_PORT, None
    err = _bind_error(cfg.host, cfg.port)
    if err is not None and err.errno == errno.EADDRINUSE:
        free = _free_port_near(cfg.host or "0.0.0.0", cfg.port + 1, DASHBOARD_PORT_TRIES, {DASHBOARD_PORT})
        _fail(f"port {cfg.port} of coe's API ({cfg.host}:{cfg.port}) is in use by another program"
              f"{_holder(cfg.port)}: start on another port with `coe serve --port {free}` "
              f"(with make: make serve ARGS=\"--port {free}\")")
    if err is not None:
        _fail(f"cannot bind coe's API to {cfg.host}:{cfg.port} ({err.strerror}): choose another address with "
              "`coe serve --host HOST --port PORT`")
    return _dashboard_port(cfg.port, dashboard_port)


def _dashboard_port(api_port: int, asked: int | None) -> tuple[int, str | None]:
    """A port asked for with ``--dashboard-port`` must be free (else fail, naming the option); the
    default 8265, when taken, gives way to a free port the kernel picks (Ray, given no port, also
    moves on rather than fail)."""
    if asked is not None:
        err = None if asked == api_port else _bind_error(DASHBOARD_HOST, asked)
        if asked != api_port and err is None:
            return asked, None
        if asked == api_port:
            what = "is the API's port (--port) too"
        elif err is not None and err.errno == errno.EADDRINUSE:
            what = f"is in use by another program{_holder(asked)}"
        else:
            what = f"cannot be bound ({getattr(err, 'strerror', err)})"
        other = _free_port_near(DASHBOARD_HOST, asked + 1, DASHBOARD_PORT_TRIES, {api_port})
        _fail(f"port {asked} of Ray's dashboard ({DASHBOARD_HOST}:{asked}, asked for with --dashboard-port) "
              f"{what}: pick another with `coe serve --dashboard-port {other}`, or leave the option out and "
              "coe picks a free one")
    if DASHBOARD_PORT != api_port and _bind_error(DASHBOARD_HOST, DASHBOARD_PORT) is None:
        return DASHBOARD_PORT, None
    # a port the kernel picks, not the next one up: two services starting at once would both take
    # 8266, and the one that binds second fails (seen with two test suites on one machine)
    port = _kernel_port(DASHBOARD_HOST, {api_port})
    held = "coe's API (--port)" if DASHBOARD_PORT == api_port else f"another program{_holder(DASHBOARD_PORT)}"
    console.print(f"[yellow]![/] Ray's dashboard port {DASHBOARD_PORT} is in use by {held}: the dashboard "
                  f"goes on port {port} instead (choose one with --dashboard-port)", soft_wrap=True)
    return port, f"{DASHBOARD_PORT} was in use"


def _start_ray(cfg, started: dict, dashboard_port: int, num_cpus: int | None, reinstall_handlers, status) -> None:
    """A Ray head of coe's own (never one it finds), or the cluster the config names; either way
    its address goes to ``$COE_HOME/ray/address`` (0600) for ``coe drain``."""
    import logging

    from coe.ray_local import init_local_ray, write_address_file

    t = time.perf_counter()
    status.update("[bold]Joining Ray…" if cfg.ray_address else "[bold]Starting Ray…")
    status.stop()  # Ray prints its start-up notice on stdout too: the spinner pauses while it is captured
    with _ray_output_to_log(fds=(1, 2)):
        if cfg.ray_address:
            import ray

            ctx = ray.init(address=cfg.ray_address, namespace="coe", log_to_driver=False,
                           logging_level=logging.WARNING)
        else:
            # every Ray port on 127.0.0.1, the token file 0600 in a 0700 directory, Ray's own head
            # (never one it finds) with its files inside the 0700 $COE_HOME/ray (docs/security.md)
            try:
                ctx = init_local_ray(include_dashboard=True, dashboard_port=dashboard_port, num_cpus=num_cpus,
                                     namespace="coe", log_to_driver=False, logging_level=logging.WARNING)
            except ValueError as e:  # Ray's advice names `ray start`; coe's option is --dashboard-port
                if "already occupied" not in str(e):
                    raise
                _fail(f"port {dashboard_port} of Ray's dashboard was taken by another program while coe started "
                      "(it was free a moment before): start again, or pick a port with `coe serve --dashboard-port`")
    status.start()
    started["ray"] = "joined" if cfg.ray_address else True
    started["ray_context"] = ctx
    reinstall_handlers()  # ray.init replaced SIGTERM's handler with one that exits without cleanup
    write_address_file(ctx, address=cfg.ray_address, started_head=not cfg.ray_address)
    started["address_file"] = True
    if cfg.ray_address:
        console.print(f"[green]✓[/] joined the Ray cluster at {cfg.ray_address} (config ray_address) in "
                      f"{time.perf_counter() - t:.1f} s")
    else:
        console.print(f"[green]✓[/] Ray started in {time.perf_counter() - t:.1f} s")


def _deploy(cfg, started: dict, status) -> None:
    status.update("[bold]Deploying the coe app (ingress, router, expert pool)…")
    import logging

    from ray import serve

    from coe.serve.app import build_app

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # rich shows progress instead
    t = time.perf_counter()
    with _ray_output_to_log():
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, detached=False)
        started["serve"] = True
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    started["drain"] = (cfg.app_name, cfg.shutdown.drain_timeout_s)
    console.print(f"[green]✓[/] app deployed in {time.perf_counter() - t:.1f} s")


READY_TIMEOUT_S = 900.0


def _wait_ready(cfg, stop: threading.Event, status) -> None:
    """Poll ``/readyz`` (an expert of every routable category loaded and run once), so that
    "serving" is printed only when the first request will not be a cold one."""
    import httpx

    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    url = f"http://{host}:{cfg.port}/readyz"
    t = time.perf_counter()
    detail = "waiting for the app"
    while not stop.is_set() and time.perf_counter() - t < READY_TIMEOUT_S:
        try:
            r = httpx.get(url, timeout=10, headers=_auth_header())
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200:
                console.print(f"[green]✓[/] experts loaded and warmed in {time.perf_counter() - t:.1f} s")
                return
            detail = body.get("detail") or detail
            if body.get("status") == "not_ready":  # warm-up finished, but a category has no expert
                failed = "; ".join(f"{n}: {why}" for n, why in (body.get("failed") or {}).items())
                console.print(f"[yellow]![/] serving, but not ready: {detail}" + (f" ({failed})" if failed else "")
                              + f"; see {url}", soft_wrap=True)
                return
        except (httpx.HTTPError, ValueError):
            pass
        status.update(f"[bold]Loading experts…[/] {detail}")
        stop.wait(1.0)
    if not stop.is_set():
        console.print(f"[yellow]![/] not ready after {READY_TIMEOUT_S:.0f} s ({detail}); see {url}")


def _auth_header() -> dict[str, str]:
    key = os.environ.get("COE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _coe_command() -> str:
    """This installation's ``coe`` as a fresh shell can run it: its absolute path (a fresh shell
    has not activated the venv, so a bare ``coe`` would be 'command not found')."""
    exe = Path(sys.argv[0])
    if exe.name != "coe" or not exe.exists():
        exe = Path(sys.executable).with_name("coe")
    return shlex.quote(str(exe.absolute()))


def _chat_url_option(api: str) -> str:
    """`coe chat` talks to 127.0.0.1:8000 unless told otherwise (COE_URL or --url)."""
    host_api = api.replace("://0.0.0.0:", "://127.0.0.1:")
    return "" if f"{host_api}/v1" == CHAT_DEFAULT_URL else f" --url {host_api}/v1"


def _print_banner(cfg, n_experts: int, took_s: float, dashboard_port: int, started: dict | None = None) -> None:
    api = f"http://{cfg.host}:{cfg.port}"
    dash = f"http://{DASHBOARD_HOST}:{dashboard_port}"
    from coe.ray_local import token_path

    token = token_path()
    dirs = (started or {}).get("ray_dirs")
    note = (started or {}).get("dashboard_note")
    if cfg.ray_address:
        ctx = (started or {}).get("ray_context")
        dash = getattr(ctx, "dashboard_url", None) or "(the cluster's)"
        dash = dash if "://" in dash or dash.startswith("(") else f"http://{dash}"
        ray_logs = f"on the cluster at {cfg.ray_address} (config ray_address)"
    elif dirs is not None:
        ray_logs = f"{dirs.logs}/serve (private to this user)"
    else:
        ray_logs = "Ray's session logs"

    lines = [
        "",
        f"[bold green]coe is serving[/]: {n_experts} experts, ready in {took_s:.0f} s",
        f"  API        {api}/v1   (OpenAI-compatible; model = coe | coe/<category> | <expert>)",
        f"  try        {_coe_command()} chat{_chat_url_option(api)} \"Hello!\"",
        f"             curl {api}/v1/models",
        f"  health     {api}/healthz (alive)   {api}/readyz (warm)   metrics: {api}/metrics",
        f"  dashboard  {dash}   (Ray token auth is on{'; ' + note if note else ''})",
        f"  token      {token} (0600): paste it when the dashboard page asks for it; for its API:",
        f"             curl -H \"Authorization: Bearer $(cat {token})\" {dash}/api/serve/applications/",
        f"  logs       {_serve_log_path()} (Ray's own notices)",
        f"             replicas: {ray_logs}",
    ]
    if dirs is not None and dirs.fallback is not None:
        lines.append(f"             (COE_HOME is too deep for Ray's unix-socket paths: Ray's files are in {dirs.temp}, "
                     f"inside the private {dirs.fallback}, linked from {dirs.root / 'tmp'})")
    for line in lines:
        console.print(line, soft_wrap=True)


def drain_app(app_name: str, timeout_s: float | None) -> list[dict]:
    """Drain every ingress replica of ``app_name`` (``Ingress.drain`` through Serve's broadcast):
    new requests get 503 ``shutting_down`` at once, ``/readyz`` 503, requests in flight get
    ``timeout_s`` (None: the app's ``shutdown.drain_timeout_s``) to finish. Returns each
    replica's report. Needs a connected Ray."""
    from ray import serve

    from coe.api.drain import CUT_GRACE_S

    handle = serve.get_deployment_handle("Ingress", app_name)
    wait_s = (timeout_s if timeout_s is not None else 3600.0) + CUT_GRACE_S + 10.0
    return list(handle.broadcast("drain", timeout_s).results(timeout_s=wait_s))


def _drain(app_name: str, timeout_s: float) -> None:
    """SIGTERM/SIGINT: drain before anything stops (docs/serving.md, "Stopping"). A second
    Ctrl-C stops waiting."""
    console.print(f"[dim]draining: new requests get 503; requests in flight have up to {timeout_s:g} s "
                  "(Ctrl-C again stops now)[/]")
    t = time.perf_counter()
    try:
        with _ray_output_to_log():
            reports = drain_app(app_name, timeout_s)
    except KeyboardInterrupt:
        err_console.print("[yellow]![/] drain interrupted: requests still in flight are cut")
        return
    except Exception as e:  # noqa: BLE001 - the app never came up, or Ray is gone: stop anyway
        err_console.print(f"[yellow]![/] drain skipped: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        return
    done = sum(int(r.get("in_flight_at_start") or 0) for r in reports)
    cut = sum(int(r.get("cut_requests") or 0) for r in reports)
    console.print(f"[green]✓[/] drained in {time.perf_counter() - t:.1f} s: {done} request(s) were in flight"
                  + (f", {cut} cut at the {timeout_s:g} s limit (they ended with an error event)" if cut else ""))


def _stop_serve() -> None:
    from ray import serve

    serve.shutdown()


def _stop_ray() -> None:
    import ray

    ray.shutdown()


def _stop_redis() -> None:
    from expert_registry.embedded import stop_embedded

    stop_embedded()


def _shutdown(started: dict) -> None:
    """Stop what this process started, in reverse order; each step is best effort. Ray reports
    the controller it kills itself as a failed task (asynchronously, on stdout or stderr): all of
    Ray's output during the stop goes to the log, and the outcome is printed after it."""
    console.print("[bold]Shutting down…")
    if started.get("drain"):
        _drain(*started["drain"])
    supervisor = started.pop("redis_supervisor", None)
    if supervisor is not None:  # first, or it would restart the Redis we are about to stop
        supervisor.stop()
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    results: list[tuple[str, Exception | None]] = []
    with _ray_output_to_log(fds=(1, 2)):
        ray_label = "Ray (disconnected; the cluster keeps running)" if started.get("ray") == "joined" else "Ray"
        for key, label, stop in (("serve", "Serve", _stop_serve), ("ray", ray_label, _stop_ray),
                                 ("redis", "embedded Redis", _stop_redis)):
            if not started.get(key):
                continue
            try:
                stop()
                results.append((label, None))
            except Exception as e:
                results.append((label, e))
    if started.get("address_file"):  # `coe drain` finds no service here any more
        from coe.ray_local import remove_address_file

        remove_address_file()
    for label, err in results:
        if err is None:
            console.print(f"[green]✓[/] {label} stopped")
        else:
            err_console.print(f"[yellow]![/] {label} shutdown: {err}")
    with contextlib.suppress(OSError):
        _serve_log(f"coe serve (pid {os.getpid()}) stopped: "
                   + (", ".join(f"{label} {'stopped' if err is None else f'failed ({err})'}" for label, err in results)
                      or "nothing had started"))


@app.command()
def drain(
    app_name: str = typer.Option("coe", "--app", help="The Serve application (config `app_name`)."),
    timeout: Optional[float] = typer.Option(None, help="Seconds in-flight requests get (default: the app's "
                                                       "shutdown.drain_timeout_s)."),
    address: Optional[str] = typer.Option(None, help="The Ray cluster to join (host:port of its GCS). Default: the "
                                                     "one `coe serve` runs on under this COE_HOME "
                                                     "($COE_HOME/ray/address); never one Ray finds by itself."),
) -> None:
    """Drain a running coe app without stopping it: new requests get 503 shutting_down, /readyz
    turns 503, requests in flight finish (the KubeRay manifest runs this as the head pod's preStop
    hook; `coe serve` does the same itself on SIGTERM/Ctrl-C)."""
    import logging

    from coe.ray_local import NoCoeRay, RayDirError, address_file, read_address_file, single_machine_mode

    if address is None:
        try:
            rec = read_address_file()
        except (NoCoeRay, RayDirError) as e:
            _fail(str(e))
        address = rec.address
        if rec.started_head:  # coe's own head: single machine, every Ray port on loopback
            single_machine_mode()
        console.print(f"[dim]joining coe's Ray at {address} (from {address_file()}, pid {rec.pid})[/]", soft_wrap=True)
    else:
        console.print(f"[dim]joining the Ray cluster at {address} (--address)[/]", soft_wrap=True)
    import ray

    # joins the running cluster as it is configured (its own auth mode): no _quiet_ray() here
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - one line, no traceback
        _fail(f"cannot join the Ray cluster at {address}: {type(e).__name__}: {' '.join(str(e).split())[:300]}", 1)
    try:
        reports = drain_app(app_name, timeout)
    except Exception as e:  # noqa: BLE001 - no such app, or Serve is not running there
        _fail(f"drain of app {app_name!r} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}", 1)
    finally:
        ray.shutdown()
    for r in reports:
        console.print(f"ingress replica: {r.get('in_flight_at_start', 0)} in flight, drained in "
                      f"{r.get('drained_in_s')} s, {r.get('cut_requests', 0)} cut")


@app.command()
def chat(
    message: Optional[str] = typer.Argument(None, help="What to ask; omit for an interactive session."),
    model: str = typer.Option("coe", "--model", "-m", help="coe | coe/<category> | <expert name>"),
    url: str = typer.Option(CHAT_DEFAULT_URL, envvar="COE_URL", help="coe's OpenAI base URL."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar=["COE_API_KEY", "OPENAI_API_KEY"],
        help="The API key, when the service has keys on (`coe keys add`). Default: COE_API_KEY, else "
             "OPENAI_API_KEY; with none, no key is sent."),
    max_tokens: Optional[int] = typer.Option(None, help="Cap on generated tokens (default: the expert's)."),
    temperature: Optional[float] = typer.Option(None),
    system: Optional[str] = typer.Option(None, help="A system message to send first."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Wait for the whole answer."),
) -> None:
    """Talk to a running `coe serve` through the OpenAI client; shows which expert answered.
    With keys on, pass --api-key or set COE_API_KEY (OPENAI_API_KEY is read when COE_API_KEY is unset)."""
    import openai

    # with no key, no Authorization header at all: the server then says "missing", not "invalid"
    client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=600)
    no_key = {} if api_key else {"extra_headers": {"Authorization": openai.Omit()}}
    source = _key_source(api_key)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def ask(text: str) -> bool:
        history.append({"role": "user", "content": text})
        kw = {"model": model, "messages": history, **no_key}
        if max_tokens:
            kw["max_tokens"] = max_tokens
        if temperature is not None:
            kw["temperature"] = temperature
        try:
            answer = _ask(client, kw, stream=not no_stream)
        except openai.APIConnectionError:
            err_console.print(f"[bold red]error:[/] cannot reach coe at {url}; is `coe serve` running?")
            history.pop()
            return False
        except openai.APIStatusError as e:
            err_console.print(f"[bold red]error {e.status_code}:[/] {_status_message(e, source)}", soft_wrap=True)
            history.pop()
            return False
        history.append({"role": "assistant", "content": answer})
        return True

    if message is not None:
        if not ask(message):
            raise typer.Exit(1)
        return
    console.print(f"[dim]coe chat: {url} model={model}; empty line or Ctrl-D to quit[/]")
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not text.strip():
            return
        ask(text)


def _key_source(api_key: str | None) -> str | None:
    """Where `coe chat`'s key came from, for its error messages."""
    if not api_key:
        return None
    for var in ("COE_API_KEY", "OPENAI_API_KEY"):
        if os.environ.get(var) == api_key:
            return f"${var}"
    return "--api-key"


def _status_message(e, key_source: str | None) -> str:
    """What an error answer means to a `coe chat` user; for a 401, whether a key was missing (none
    sent: code ``missing_api_key``) or is not valid (``invalid_api_key``), and what to do."""
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    msg = err.get("message") or str(e)
    if e.status_code != 401:
        return msg
    if err.get("code") == "missing_api_key" or key_source is None:
        return "missing API key: pass --api-key or set COE_API_KEY (`coe keys add NAME` creates one)"
    return (f"invalid API key (from {key_source}): this service does not know it; pass another with --api-key "
            "or COE_API_KEY (`coe keys list` shows the service's keys)")


def _route_line(coe: dict | None) -> str:
    if not coe:
        return "[dim](no routing info)[/]"
    if coe.get("forced") == "expert" or not coe.get("category"):  # the router was bypassed: no category
        return f"[dim]→ expert [bold]{coe.get('expert')}[/bold] (named in the request, router bypassed)[/]"
    probs = coe.get("category_probs") or []
    top = f" p={probs[0].get('prob', 0):.2f}" if probs else ""
    return (f"[dim]→ expert [bold]{coe.get('expert')}[/bold], category {coe.get('category')}{top}, "
            f"{coe.get('forced', 'auto')}, routed in {coe.get('route_ms', 0):.1f} ms[/]")


def _ask(client, kw: dict, stream: bool) -> str:
    if not stream:
        resp = client.chat.completions.create(**kw)
        coe = (resp.model_extra or {}).get("coe")
        console.print(_route_line(coe))
        text = resp.choices[0].message.content or ""
        console.print(text)
        u = resp.usage
        if u:
            console.print(f"[dim]({u.prompt_tokens} prompt + {u.completion_tokens} completion tokens)[/]")
        return text
    parts: list[str] = []
    usage = None
    t0 = time.perf_counter()
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        coe = (chunk.model_extra or {}).get("coe")
        if coe:
            console.print(_route_line(coe))
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta and ch.delta.content:
                parts.append(ch.delta.content)
                sys.stdout.write(ch.delta.content)
                sys.stdout.flush()
    sys.stdout.write("\n")
    if usage:
        dt = time.perf_counter() - t0
        console.print(f"[dim]({usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens, "
                      f"{dt:.1f} s)[/]")
    return "".join(parts)


if __name__ == "__main__":  # pragma: no cover
    app()
