"""``coe keys …``: create, list, limit and revoke API keys (mounted by ``coe/cli.py``).

Keys and their limits live hashed in the registry's Redis (decision 5 of DESIGN.md; see
:mod:`coe.keys`): the same ``--redis-url`` / ``--namespace`` as ``coe-registry``. Every running
replica picks a change up within a second, without a restart; adding the first key switches auth on.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import redis
import typer
from rich.console import Console
from rich.table import Table

from coe.keys import KeyLimits, RedisKeyStore

app = typer.Typer(help="Manage API keys and per-key limits (stored hashed in the registry's Redis; a key is "
                       "shown once, when created).", no_args_is_help=True)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

RedisUrl = Annotated[Optional[str], typer.Option(
    "--redis-url", envvar="COE_REDIS_URL", help="Redis of the registry (default: the embedded one).")]
Namespace = Annotated[str, typer.Option("--namespace", "-n", envvar="COE_NAMESPACE", help="Registry namespace.")]
Rpm = Annotated[Optional[int], typer.Option(help="Requests per minute.")]
Tpm = Annotated[Optional[int], typer.Option(help="Tokens (prompt + completion) per minute.")]
Budget = Annotated[Optional[int], typer.Option("--budget", help="Tokens per budget period.")]
Period = Annotated[Optional[str], typer.Option("--period", help="Budget period: hour | day | week | month.")]
Experts = Annotated[Optional[str], typer.Option(help="Comma-separated experts the key may use.")]
Categories = Annotated[Optional[str], typer.Option(help="Comma-separated categories the key may use.")]
Feedback = Annotated[Optional[bool], typer.Option(
    "--feedback/--no-feedback", help="Whether the key may score its answers (POST /v1/feedback); default: may.")]


def _fail(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


def _store(redis_url: str | None, namespace: str) -> RedisKeyStore:
    from expert_registry.embedded import resolve_redis_url

    try:
        return RedisKeyStore(resolve_redis_url(redis_url), namespace)
    except Exception as e:  # embedded Redis could not start
        _fail(str(e))
        raise


def _limit_changes(rpm, tpm, budget, period, experts, categories, clear: bool = False,
                   feedback: bool | None = None) -> dict[str, Any]:
    ch: dict[str, Any] = {} if feedback is None else {"feedback": feedback}
    for k, v in (("rpm", rpm), ("tpm", tpm), ("token_budget", budget), ("budget_period", period)):
        if v is not None:
            ch[k] = None if v == 0 else v
    for k, v in (("experts", experts), ("categories", categories)):
        if v is not None:
            ch[k] = [x.strip() for x in v.split(",") if x.strip()] or None
    return ch


def _limits_text(lim: KeyLimits) -> str:
    parts = [f"rpm {lim.rpm}" if lim.rpm else "", f"tpm {lim.tpm}" if lim.tpm else "",
             f"budget {lim.token_budget}/{lim.budget_period}" if lim.token_budget else "",
             f"experts {','.join(lim.experts)}" if lim.experts is not None else "",
             f"categories {','.join(lim.categories)}" if lim.categories is not None else "",
             "" if lim.feedback else "no feedback"]
    return "; ".join(p for p in parts if p) or "none"


@app.command("add")
def add(name: str = typer.Argument(..., help="A label for the key (who or what uses it)."),
        role: str = typer.Option("user", help="user: the /v1 API; admin: also admin routes."),
        rpm: Rpm = None, tpm: Tpm = None, budget: Budget = None, period: Period = None,
        experts: Experts = None, categories: Categories = None, feedback: Feedback = None,
        redis_url: RedisUrl = None, namespace: Namespace = "default") -> None:
    """Create a key and print it once; only its SHA-256 is stored."""
    if role not in ("user", "admin"):
        _fail(f"--role must be 'user' or 'admin', got {role!r}")
    try:
        limits = KeyLimits.model_validate(_limit_changes(rpm, tpm, budget, period, experts, categories,
                                                         feedback=feedback))
        key, rec = _store(redis_url, namespace).add(name, role, limits)  # type: ignore[arg-type]
    except (ValueError, redis.RedisError) as e:
        _fail(" ".join(str(e).split()))
    console.print(f"[green]✓[/] {role} key [bold]{rec.name}[/] (id {rec.id}) added; limits: {_limits_text(rec.limits)}")
    console.print("  Copy it now; it is not stored and cannot be shown again:")
    print(key)  # plain print: no wrapping/markup, easy to capture
    console.print("[dim]  use it as: Authorization: Bearer <key>   (OpenAI clients: api_key=<key>)[/]")


@app.command("limits")
def limits(name_or_id: str = typer.Argument(..., help="The key's name or id."),
           rpm: Rpm = None, tpm: Tpm = None, budget: Budget = None, period: Period = None,
           experts: Experts = None, categories: Categories = None, feedback: Feedback = None,
           redis_url: RedisUrl = None, namespace: Namespace = "default") -> None:
    """Change a key's limits (0 or an empty list removes one); running replicas apply it within a second."""
    try:
        rec = _store(redis_url, namespace).set_limits(
            name_or_id, **_limit_changes(rpm, tpm, budget, period, experts, categories, feedback=feedback))
    except KeyError as e:
        _fail(str(e.args[0]))
    except (ValueError, redis.RedisError) as e:
        _fail(" ".join(str(e).split()))
    console.print(f"[green]✓[/] key [bold]{rec.name}[/]: limits {_limits_text(rec.limits)}")


@app.command("list")
def list_(redis_url: RedisUrl = None, namespace: Namespace = "default",
          as_json: bool = typer.Option(False, "--json")) -> None:
    """The stored keys (names, roles, hints, limits; never the keys) and their usage this window."""
    from coe.tenant_limits import TenantLimiter

    store = _store(redis_url, namespace)
    try:
        records = store.list()
        limiter = TenantLimiter(store.r, namespace)
        usage = {r.id: limiter.usage(r) for r in records}
    except redis.RedisError as e:
        _fail(f"cannot read keys: {e}")
    if as_json:
        print(json.dumps([{**r.public(), "usage": usage[r.id]} for r in records], indent=2))
        return
    if not records:
        console.print("no keys: the API is open (fine on 127.0.0.1 only)")
        return
    t = Table("id", "name", "role", "hint", "limits", "usage now", "created")
    for r in records:
        t.add_row(r.id, r.name, r.role, r.hint, _limits_text(r.limits),
                  ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in usage[r.id].items()), r.created_at)
    console.print(t)


@app.command("remove")
def remove(name_or_id: str = typer.Argument(..., help="The key's name or id."),
           redis_url: RedisUrl = None, namespace: Namespace = "default") -> None:
    """Revoke a key (running replicas stop accepting it within a second)."""
    try:
        rec = _store(redis_url, namespace).remove(name_or_id)
    except KeyError as e:
        _fail(str(e.args[0]))
    except redis.RedisError as e:
        _fail(str(e))
    console.print(f"[green]✓[/] removed key [bold]{rec.name}[/] (id {rec.id})")
