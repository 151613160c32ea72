"""Where an expert's weights come from, and what they will cost in memory.

A GGUF file is converted once (transformers dequantises it; ~40 s for a 135M model on 2 cores) into a
safetensors folder under ``state_dir("models")``, keyed by the file's name, size and mtime, so every
later load — in this process or the next — reads safetensors. A file lock makes concurrent processes
share one conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

#: transformers' loading patches process-global state (default device, init functions); two loads in
#: two threads at once corrupt each other, so every from_pretrained in coe runs under this lock.
LOAD_LOCK = threading.RLock()

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# safetensors header dtypes -> bytes per element
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelSource:
    """A resolved expert model: a local folder or GGUF file (hub ids resolve to their cached snapshot)."""

    kind: str  # "folder" | "gguf"
    path: str  # absolute folder or .gguf file


def resolve_source(model: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    """Map ``Expert.model`` (+ ``gguf_file``) to a local folder or GGUF file.

    A hub id resolves to its snapshot in the local Hugging Face cache (never downloads); anything
    missing raises FileNotFoundError / the registry's ModelNotFound with a one-line reason."""
    p = Path(model).expanduser()
    if not p.exists():
        from expert_registry.model_files import resolve_model_path

        p = resolve_model_path(model, revision)
    if gguf_file:
        cand = p / gguf_file if p.is_dir() else p
        if p.is_dir() and not cand.resolve().is_relative_to(p.resolve()):
            raise FileNotFoundError(f"gguf_file {gguf_file!r} points outside the model folder {p}")
        if not cand.is_file():
            raise FileNotFoundError(f"GGUF file {cand} does not exist")
        return ModelSource("gguf", str(cand.resolve()))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise FileNotFoundError(f"{p} is a file but not a .gguf; give the model folder instead")
        return ModelSource("gguf", str(p.resolve()))
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model folder {p} has no config.json")
    return ModelSource("folder", str(p.resolve()))


def _cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}"


def gguf_cache_dir(gguf: str | Path) -> Path:
    """Folder the converted safetensors copy of ``gguf`` lives in (may not exist yet)."""
    from expert_registry.paths import state_dir

    return state_dir("models") / _cache_key(Path(gguf))


def ensure_converted(gguf: str | Path) -> Path:
    """Convert ``gguf`` to a safetensors folder once; return the folder. Safe across processes."""
    gguf = Path(gguf)
    target = gguf_cache_dir(gguf)
    if (target / "config.json").is_file() and (target / ".complete").is_file():
        return target
    lock_path = target.with_suffix(".lock")
    with LOAD_LOCK, FileLock(lock_path):
        if (target / ".complete").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are already dequantised; drop the GGUF "quantizer" so save_pretrained accepts it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / ".complete").write_text(json.dumps({"source": str(gguf.resolve())}))
        del model
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return target


def _safetensors_elements(folder: Path) -> list[tuple[int, int]]:
    """(elements, bytes-per-element) of every tensor in the folder's safetensors files (headers only)."""
    out: list[tuple[int, int]] = []
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model folder {folder} has no *.safetensors files")
    for f in files:
        out.extend(_safetensors_elements_file(f))
    return out


def _safetensors_elements_file(f: Path) -> list[tuple[int, int]]:
    """(elements, bytes-per-element) of one safetensors file, from its header (one shared reader)."""
    from expert_registry.weights_header import safetensors_tensors

    try:
        return [(n, _ST_BYTES.get(dtype, 4)) for n, dtype in safetensors_tensors(f)]
    except ValueError as exc:
        raise ValueError(f"{f}: {exc}") from None


def _gguf_elements(path: Path) -> list[tuple[int, int]]:
    """(elements, 4) per tensor of a GGUF (transformers dequantises to float32); the bounded
    header reader of expert_registry, not ``gguf.GGUFReader`` (slow, unbounded)."""
    from expert_registry.weights_header import read_gguf_header

    return [(t.numel, 4) for t in read_gguf_header(path).tensors]


def estimate_bytes(source: ModelSource, dtype: str) -> int:
    """Bytes the weights will take once loaded with ``dtype`` ("auto" keeps the stored width).

    Reads only file headers, so it is cheap enough to run when an expert is added."""
    if source.kind == "gguf":
        conv = gguf_cache_dir(source.path)
        elems = _safetensors_elements(conv) if (conv / ".complete").is_file() else _gguf_elements(Path(source.path))
    else:
        elems = _safetensors_elements(Path(source.path))
    width = _DTYPE_BYTES.get(dtype)
    return sum(n * (width if width and w >= 2 else w) for n, w in elems)


def diagnose_files(source: ModelSource) -> str | None:
    """Name the first missing or unreadable weights file of ``source`` (None if all look fine)."""
    try:
        p = Path(source.path)
        if not p.exists():
            return f"{p} does not exist"
        folder = p if source.kind == "folder" else gguf_cache_dir(p)
        if not folder.is_dir():
            return None
        files = sorted(folder.glob("*.safetensors"))
        if source.kind == "folder" and not files:
            return f"{folder} has no *.safetensors files"
        for f in files:
            try:
                _safetensors_elements_file(f)
            except (OSError, ValueError, KeyError) as exc:
                return f"{f}: corrupt safetensors file ({exc})"
    except OSError as exc:
        return str(exc)
    return None
