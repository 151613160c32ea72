"""``coe keys …``: create, list and revoke API keys (mounted by ``coe/cli.py``).

Keys live hashed in ``$COE_API_KEYS_FILE`` or ``$COE_HOME/api_keys.json`` (mode 0600). A running
service re-reads that file within a second, so adding the first key switches auth on and removing
the last one switches it off, without a restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from coe import security

app = typer.Typer(help="Manage API keys (stored hashed; a key is shown once, when created).",
                  no_args_is_help=True)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

FileOpt = typer.Option(None, "--file", help="Keys file (default: $COE_API_KEYS_FILE or $COE_HOME/api_keys.json).")


def _fail(msg: str) -> None:
    err_console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


@app.command("add")
def add(name: str = typer.Argument(..., help="A label for the key (who or what uses it)."),
        role: str = typer.Option("user", help="user: the /v1 API; admin: also admin routes."),
        file: Optional[Path] = FileOpt) -> None:
    """Create a key and print it once; only its salted hash is stored."""
    if role not in ("user", "admin"):
        _fail(f"--role must be 'user' or 'admin', got {role!r}")
    try:
        key, rec = security.add_key(name, role, file)  # type: ignore[arg-type]
    except (ValueError, security.KeyFileError, OSError) as e:
        _fail(str(e))
    path = security.keys_file_path(file)
    console.print(f"[green]✓[/] {role} key [bold]{rec.name}[/] (id {rec.id}) added to {path}")
    console.print("  Copy it now; it is not stored and cannot be shown again:")
    print(key)  # plain print: no wrapping/markup, easy to capture
    console.print("[dim]  use it as: Authorization: Bearer <key>   (OpenAI clients: api_key=<key>)[/]")


@app.command("list")
def list_(file: Optional[Path] = FileOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """The stored keys (names, roles, hints; never the keys)."""
    try:
        records = security.list_keys(file)
    except security.KeyFileError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps([r.public() for r in records], indent=2))
        return
    if not records:
        console.print(f"no keys in {security.keys_file_path(file)}: the API is open (fine on 127.0.0.1 only)")
        return
    t = Table("id", "name", "role", "hint", "created")
    for r in records:
        t.add_row(r.id, r.name, r.role, r.hint, r.created_at)
    console.print(t)


@app.command("remove")
def remove(name_or_id: str = typer.Argument(..., help="The key's name or id."), file: Optional[Path] = FileOpt) -> None:
    """Revoke a key (a running service stops accepting it within a second)."""
    try:
        rec = security.remove_key(name_or_id, file)
    except KeyError as e:
        _fail(str(e.args[0]))
    except (security.KeyFileError, OSError) as e:
        _fail(str(e))
    console.print(f"[green]✓[/] removed key [bold]{rec.name}[/] (id {rec.id})")
