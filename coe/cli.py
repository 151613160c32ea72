"""The ``coe`` command: ``coe serve``, ``coe chat``, ``coe router …`` (from ``routers.cli``) and ``coe keys …`` (from ``coe.keys_cli``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
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
app.add_typer(keys_app, name="keys", help="Create, list and revoke API keys.")

from coe.keys_cli import app as keys_app  # noqa: E402

app.add_typer(keys_app, name="keys", help="Create, list and revoke API keys (stored hashed).")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DASHBOARD_HOST = "127.0.0.1"
DASHBOARD_PORT = 8265


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (coe or Ray serve_config format)."),
    host: Optional[str] = typer.Option(None, help="Bind address of the HTTP API (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port of the HTTP API (default 8000)."),
    demo: Optional[bool] = typer.Option(None, "--demo/--no-demo", help="Register the demo experts (SmolLM2) if missing."),
    dashboard_port: int = typer.Option(DASHBOARD_PORT, help="Port of Ray's dashboard (bound to 127.0.0.1)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs Ray may use (default: all)."),
) -> None:
    """Start Redis (embedded unless COE_REDIS_URL), a local Ray and the coe app; Ctrl-C stops all of it."""
    # quiet third-party progress bars (GGUF conversion, weight loading); rich shows progress instead.
    # Set before transformers/tqdm are imported; Ray workers inherit it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from coe.config import ServeConfig

    try:
        cfg = ServeConfig.from_yaml(config) if config else ServeConfig()
    except Exception as e:  # pydantic / yaml errors as one line
        _fail(f"{config}: {' '.join(str(e).split())}")
    upd = {k: v for k, v in {"host": host, "port": port, "demo": demo}.items() if v is not None}
    cfg = cfg.model_copy(update=upd).with_env()
    from coe.security import KeyStore, check_bind, install_log_redaction

    install_log_redaction()
    try:
        keys = KeyStore(path=cfg.security.api_keys_file)
    except Exception as e:
        _fail(str(e))
    warning = check_bind(cfg.host, keys.configured)
    if warning:
        err_console.print(f"[bold white on red] {warning} [/]")
    console.print(f"[dim]API keys: {'on (' + str(len(keys.records)) + ' key(s))' if keys.configured else 'off'}; "
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

    started: dict[str, bool] = {"redis": False, "ray": False, "serve": False}
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
    from expert_registry.embedded import embedded_status, ensure_embedded, mask_url
    from expert_registry.store import RedisRegistry

    t_all = time.perf_counter()
    with console.status("[bold]Starting Redis…") as status:
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
            where = f"embedded Redis at {url} ({'reused' if was_running else 'started'})"
        cfg = cfg.model_copy(update={"redis_url": url})
        registry = RedisRegistry(url, namespace=cfg.namespace)
        try:
            registry.ping()
        except Exception as e:
            _fail(str(e))
        console.print(f"[green]✓[/] {where}")

        if cfg.demo:
            from coe.demo import ensure_demo, prepare_demo_weights

            status.update("[bold]Registering demo experts…")
            added = ensure_demo(registry)
            console.print(f"[green]✓[/] demo experts: {', '.join(added) if added else 'already registered'}",
                          soft_wrap=True)
            status.update("[bold]Converting the SmolLM2 GGUF (first start only, ~40 s on 2 cores)…")
            t = time.perf_counter()
            folder = prepare_demo_weights()
            console.print(f"[green]✓[/] demo weights ready in {time.perf_counter() - t:.1f} s ({folder})", soft_wrap=True)
        n = len(registry.list())
        if n == 0:
            console.print("[yellow]![/] the registry is empty: add experts with `coe-registry add`, "
                          "or start with --demo")
        if stop.is_set():
            return

        status.update("[bold]Loading the router (trains on first start)…")
        t = time.perf_counter()
        from coe.serve.router_deployment import load_router

        router = load_router(cfg.router.path)
        console.print(f"[green]✓[/] router ready in {time.perf_counter() - t:.1f} s "
                      f"({len(router.categories)} categories)")
        del router
        if stop.is_set():
            return

        status.update("[bold]Starting Ray…")
        from coe.ray_local import init_local_ray

        t = time.perf_counter()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # workers inherit it: nothing downloads at run time
        # every Ray port on 127.0.0.1, token file 0600 in a 0700 directory (docs/security.md)
        init_local_ray(include_dashboard=True, dashboard_port=dashboard_port, num_cpus=num_cpus, namespace="coe",
                       log_to_driver=False)
        started["ray"] = True
        reinstall_handlers()  # ray.init replaced SIGTERM's handler with one that exits without cleanup
        console.print(f"[green]✓[/] Ray started in {time.perf_counter() - t:.1f} s")
        if stop.is_set():
            return

        status.update("[bold]Deploying the coe app (ingress, router, expert pool)…")
        import logging

        from ray import serve

        from coe.serve.app import build_app

        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # rich shows progress instead

        t = time.perf_counter()
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, detached=False)
        started["serve"] = True
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
        console.print(f"[green]✓[/] app deployed in {time.perf_counter() - t:.1f} s")

    api = f"http://{cfg.host}:{cfg.port}"
    dash = f"http://{DASHBOARD_HOST}:{dashboard_port}"
    from coe.ray_local import token_path

    token = token_path()
    lines = [
        "",
        f"[bold green]coe is serving[/]: {len(registry.list())} experts, started in {time.perf_counter() - t_all:.0f} s",
        f"  API        {api}/v1   (OpenAI-compatible; model = coe | coe/<category> | <expert>)",
        f"  try        coe chat \"Hello!\"    curl {api}/v1/models",
        f"  health     {api}/healthz    metrics: {api}/metrics",
        f"  dashboard  {dash}   (Ray token auth is on)",
        f"  token      {token} (0600): paste it when the dashboard page asks for it; for its API:",
        f"             curl -H \"Authorization: Bearer $(cat {token})\" {dash}/api/serve/applications/",
    ]
    for line in lines:
        console.print(line, soft_wrap=True)


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
    """Stop what this process started, in reverse order; each step is best effort."""
    console.print("[bold]Shutting down…")
    supervisor = started.pop("redis_supervisor", None)
    if supervisor is not None:  # first, or it would restart the Redis we are about to stop
        supervisor.stop()
    for key, label, stop in (("serve", "Serve", _stop_serve), ("ray", "Ray", _stop_ray),
                             ("redis", "embedded Redis", _stop_redis)):
        if not started.get(key):
            continue
        try:
            stop()
            console.print(f"[green]✓[/] {label} stopped")
        except Exception as e:
            err_console.print(f"[yellow]![/] {label} shutdown: {e}")


@app.command()
def chat(
    message: Optional[str] = typer.Argument(None, help="What to ask; omit for an interactive session."),
    model: str = typer.Option("coe", "--model", "-m", help="coe | coe/<category> | <expert name>"),
    url: str = typer.Option(os.environ.get("COE_URL", "http://127.0.0.1:8000/v1"), help="coe's OpenAI base URL."),
    max_tokens: Optional[int] = typer.Option(None, help="Cap on generated tokens (default: the expert's)."),
    temperature: Optional[float] = typer.Option(None),
    system: Optional[str] = typer.Option(None, help="A system message to send first."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Wait for the whole answer."),
) -> None:
    """Talk to a running `coe serve` through the OpenAI client; shows which expert answered."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=os.environ.get("COE_API_KEY", "not-needed"), max_retries=0,
                           timeout=600)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def ask(text: str) -> bool:
        history.append({"role": "user", "content": text})
        kw = {"model": model, "messages": history}
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
            body = e.body if isinstance(e.body, dict) else {}
            msg = (body.get("error") or body).get("message", str(e)) if isinstance(body, dict) else str(e)
            err_console.print(f"[bold red]error {e.status_code}:[/] {msg}")
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


def _route_line(coe: dict | None) -> str:
    if not coe:
        return "[dim](no routing info)[/]"
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
