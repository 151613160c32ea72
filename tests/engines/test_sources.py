"""Model source resolution refuses paths that escape the expert's model folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from coe.engines.sources import resolve_source


def test_gguf_file_cannot_escape_the_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="outside the model folder"):
        resolve_source(str(folder), gguf_file="../elsewhere.gguf")


def test_gguf_file_inside_the_folder_resolves(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF")
    src = resolve_source(str(folder), gguf_file="m.gguf")
    assert src.kind == "gguf" and Path(src.path) == (folder / "m.gguf").resolve()
