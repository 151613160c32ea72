"""What ``coe-registry list`` prints: the experts as a table that fits the terminal.

* ``list``: one row per expert (name, status, size, context, categories), in a boxed table.
* ``list -l``: the same columns plus the engine, and under each row its model (the file or folder
  name, or the hub id) and tags, cut with an ellipsis where the terminal ends; the footer says where
  the full path is (``--wide``, ``show``). Laid out by hand, not by rich's table: a table with a
  model column does not fit 80 columns without folding every column mid-word.
* ``list --wide``: ``-l`` with the model's full path and nothing cut (lines may pass the edge).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

GAP = 2  # spaces between columns
LABEL = 10  # "  model   " / "  status  ": the detail lines' label width, indent included


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _where(live: Any) -> str:
    """Where the status column comes from (the footer's first part)."""
    if live is not None and live.error is None:
        return f"status from the service at {live.url}"
    return f"{live.error}: status as stored" if live is not None else "status as stored"


def _status(e: Any, live: Any) -> str:
    """The service's status of a stored-ready expert (``loading: <phase> (12 s)``), else the stored one."""
    return (live.status(e.name) if live is not None and e.status == "ready" else None) or e.status


def _status_style(shown: str) -> str:
    return "" if shown == "ready" else "yellow" if shown.startswith("loading") else "red"


def _caps(e: Any) -> list[str]:
    return [f"{c}={s:g}" for c, s in sorted(e.capabilities.items(), key=lambda kv: -kv[1])]


def short_table(snap: Any, namespace: str, live: Any = None) -> Table:
    """``list``: one row per expert with the values as stored (the status as the service sees it,
    when one answered). Short columns never wrap; categories wrap at spaces, so 80 columns stay
    readable."""
    table = Table(title=f"experts in namespace '{namespace}' (registry version {snap.version})",
                  caption=_where(live), caption_justify="left", title_justify="left", box=box.HEAVY_HEAD)
    for col in ("name", "status", "size", "ctx"):
        if col == "status":  # "loading: reading weights (12 s)" folds inside its cell
            table.add_column(col, overflow="fold", max_width=18)
            continue
        table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=32 if col == "name" else None)
    table.add_column("categories", overflow="fold", min_width=11)
    for e in snap.experts.values():
        shown = _status(e, live)
        style = _status_style(shown)
        status = f"[{style}]{shown}[/{style}]" if style else shown
        table.add_row(e.name, status, fmt_bytes(e.size_bytes), str(e.max_context), " ".join(_caps(e)) or "-")
    return table


def model_text(e: Any, wide: bool) -> str:
    """The model as ``list -l`` shows it: a local path's last part (``--wide``: the full path, with
    the GGUF file joined to its folder), a hub id as it is; a GGUF file of a hub repo in brackets."""
    local = e.model.startswith("/")
    if wide and local:
        return str(Path(e.model) / e.gguf_file) if e.gguf_file else e.model
    model = Path(e.model).name if local else e.model
    return model + (f" [{e.gguf_file}]" if e.gguf_file else "")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _fill(items: list[str], width: int) -> list[str]:
    """``items`` joined by spaces into lines of at most ``width`` (an item is never split)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 1 + len(item) <= width:
            lines[-1] += " " + item
        else:
            lines.append(item)
    return lines or ["-"]


def _widths(rows: list[list[str]], caps: list[list[str]], width: int, wide: bool) -> list[int]:
    """Column widths (name, status, engine, size, ctx, categories) that fit ``width``: the short
    columns as wide as their longest value; the rest split between name (cut with an ellipsis, at
    least 12) and categories (at least their longest single item)."""
    heads = ["name", "status", "engine", "size", "ctx"]
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    cat_min = max([len("categories")] + [len(c) for cs in caps for c in cs])
    if wide:
        return w + [max([cat_min] + [len(" ".join(cs)) for cs in caps])]
    fixed = 1 + sum(w[1:]) + GAP * 5
    w[0] = min(w[0], max(12, width - fixed - cat_min))
    return w + [max(cat_min, width - fixed - w[0])]


def _row_lines(row: list[str], caps: list[str], w: list[int], wide: bool) -> list[Text]:
    """One expert's table row: its cells on the first line, more categories on the next ones."""
    cats = _fill(caps, w[5]) if not wide else [" ".join(caps) or "-"]
    first = Text(" " + _cut(row[0], w[0]).ljust(w[0] + GAP))
    first.append(row[1].ljust(w[1]), style=_status_style(row[1]))
    for i in (2, 3, 4):
        first.append(" " * GAP + row[i].ljust(w[i]))
    first.append(" " * GAP + cats[0])
    pad = " " * (1 + sum(w[:5]) + GAP * 5)
    return [first] + [Text(pad + c) for c in cats[1:]]


def _details(e: Any, shown: str, width: int, wide: bool) -> list[Text]:
    """The lines under an expert's row: model, tags, and a status's detail (loading phase, or why
    it failed), each cut at the terminal's edge unless ``wide``."""
    items = [("model", model_text(e, wide), "")]
    if e.tags:
        items.append(("tags", ", ".join(e.tags), ""))
    if ":" in shown:  # "loading: reading weights (12 s)"
        items.append(("status", shown, _status_style(shown)))
    if e.status == "failed" and e.status_reason:
        items.append(("reason", e.status_reason, "red"))
    room = width - LABEL
    return [Text("  " + label.ljust(LABEL - 2)).append(value if wide else _cut(value, room), style=style)
            for label, value, style in items]


def long_listing(snap: Any, namespace: str, live: Any, width: int, wide: bool = False) -> Text:
    """``list -l`` / ``list --wide``: see the module docstring."""
    experts = list(snap.experts.values())
    shown = {e.name: _status(e, live) for e in experts}
    rows = [[e.name, shown[e.name].split(":", 1)[0], e.engine, fmt_bytes(e.size_bytes), str(e.max_context)]
            for e in experts]
    caps = [_caps(e) for e in experts]
    w = _widths(rows, caps, width, wide)
    header = Text(" " + "".join(h.ljust(w[i] + GAP) for i, h in enumerate(
        ["name", "status", "engine", "size", "ctx"])) + "categories", style="bold")
    total = min(width, 1 + sum(w) + GAP * 5) if not wide else 1 + sum(w) + GAP * 5
    lines = [Text(f"experts in namespace '{namespace}' (registry version {snap.version})"), header,
             Text("─" * total)]
    for i, e in enumerate(experts):
        if i:
            lines.append(Text(""))
        lines += _row_lines(rows[i], caps[i], w, wide)
        lines += _details(e, shown[e.name], width, wide)
    if not experts:
        lines.append(Text(" (none: coe-registry add NAME --model PATH adds one)"))
    lines.append(Text(""))
    lines += [Text(line) for line in (_fill(_where(live).split(" "), width) if not wide else [_where(live)])]
    if not wide:
        lines.append(Text("full model paths: coe-registry list --wide, or coe-registry show NAME"))
    return Text("\n").join(lines)
