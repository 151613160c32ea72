"""One way to write and read router artifacts: ``<stem>.json`` (metadata) + ``<stem>.npz`` (arrays).

Why a module of its own: every learned part of the router (classifier, quality predictor) is saved
the same way, and the rule that matters — nothing is ever unpickled (``allow_pickle=False``), a
wrong or half-written folder is a one-line :class:`ArtifactError` — should live in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from routers.errors import ArtifactError


def write_artifact(directory: str | Path, stem: str, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> Path:
    """Write ``stem.npz`` then ``stem.json`` into ``directory`` (created); returns the folder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / f"{stem}.npz", **arrays)
    (d / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    return d


def read_artifact(directory: str | Path, stem: str, fmt: str, keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read what :func:`write_artifact` wrote, checking the ``format`` tag and the array names."""
    d = Path(directory)
    try:
        doc = json.loads((d / f"{stem}.json").read_text())
        with np.load(d / f"{stem}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in keys}
    except FileNotFoundError as e:
        raise ArtifactError(f"{d}: not a {stem} folder (missing {Path(e.filename).name})") from None
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise ArtifactError(f"{d}: unreadable {stem} artifact ({e})") from None
    if doc.get("format") != fmt:
        raise ArtifactError(f"{d}/{stem}.json: format {doc.get('format')!r}, expected {fmt!r}")
    return doc, arrays
