"""The ``coe`` command: ``coe serve``, ``coe chat`` and ``coe router …`` (mounted from ``routers.cli``)."""

from __future__ import annotations

import typer

from routers.cli import app as router_app

app = typer.Typer(
    name="coe",
    help="coe: one OpenAI-compatible endpoint in front of many expert LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(router_app, name="router", help="Train, explain and evaluate the two-stage router.")

if __name__ == "__main__":  # pragma: no cover
    app()
