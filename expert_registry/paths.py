"""Where coe keeps its state on disk.

One root (``COE_HOME``, default ``~/.local/share/coe``) so that a user can find, back up or wipe
everything coe wrote: the embedded Redis data, converted model caches and trained router artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path


def coe_home() -> Path:
    """Root of coe's on-disk state; created on first use."""
    root = Path(os.environ.get("COE_HOME") or Path.home() / ".local" / "share" / "coe").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def state_dir(name: str) -> Path:
    """A named sub-folder of :func:`coe_home` (``redis``, ``models``, ``router`` …), created on use."""
    path = coe_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
