"""The one reader of weight-file headers (GGUF and safetensors) that coe uses, bounded against
hostile files.

GGUF: parsed here with the ``gguf`` package's type tables rather than ``gguf.GGUFReader``, which
builds numpy views of every metadata item (49k tokenizer strings for SmolLM2: seconds) and bounds
nothing. This reader seeks past what it does not keep (milliseconds) and refuses, with a one-line
``ValueError``, any header beyond :data:`GGUF_LIMITS`: nesting depth, key/tensor/array counts,
string sizes, and a file without tensors. Nothing it reads can make it allocate more than a few
MiB or recurse deeply (a deeply nested array used to end in a ``RecursionError``; an 80 MB file
of nested arrays took ~700 MB and 40 s and was then accepted with zero tensors).

safetensors: the ``safetensors`` library's own header parser (``safe_open``), which checks the
header length, the JSON and that every tensor's offsets fit the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO


@dataclass(frozen=True)
class GGUFLimits:
    """What a GGUF header may hold. Far above any real model (Llama-3 405B: ~1.1k tensors, a
    256k vocabulary, templates of a few KiB), far below what hurts."""

    max_depth: int = 2  # arrays of scalars/strings, and arrays of those; no deeper
    max_kv: int = 4096
    max_tensors: int = 1_000_000
    max_array: int = 16_777_216  # items in one array (vocabularies, merges)
    max_string: int = 16 << 20  # bytes of one string (chat templates are a few KiB)
    max_kept_items: int = 4096  # small arrays are kept in the metadata; larger ones are skipped
    max_dims: int = 8


GGUF_LIMITS = GGUFLimits()
GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # large arrays (the vocabulary) are skipped: their value is None
    tensors: list[GGUFTensor]
    data_start: int


class _Reader:
    def __init__(self, f: BinaryIO, size: int, limits: GGUFLimits):
        self.f, self.size, self.lim = f, size, limits

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("file ends inside the header (truncated?)")
        return b

    def skip(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise ValueError("file ends inside the header (truncated?)")
        self.f.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def count(self, what: str, limit: int) -> int:
        n = self.unpack("<Q")
        if n > limit:
            raise ValueError(f"{what} {n} is beyond the limit of {limit} (corrupt or hostile file)")
        if n > self.size:
            raise ValueError(f"{what} {n} exceeds the file size (truncated or corrupt?)")
        return n

    def string(self, keep: bool = True) -> str | None:
        n = self.count("string length", self.lim.max_string)
        if not keep:
            self.skip(n)
            return None
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string(keep)
        if vtype != _ARRAY:
            raise ValueError(f"unknown GGUF value type {vtype}")
        if depth >= self.lim.max_depth:
            raise ValueError(f"metadata arrays nested deeper than {self.lim.max_depth} levels (corrupt or hostile file)")
        itype = self.unpack("<I")
        n = self.count("array length", self.lim.max_array)
        keep = keep and n <= self.lim.max_kept_items
        if itype in _SCALAR and not keep:  # a fixed-size array: one seek
            self.skip(n * struct.calcsize(_SCALAR[itype]))
            return None
        items = [self.value(itype, keep, depth + 1) for _ in range(n)]
        return items if keep else None


def read_gguf_header(path: str | os.PathLike[str], limits: GGUFLimits = GGUF_LIMITS) -> GGUFHeader:
    """The header of a GGUF file (metadata, tensor table, where the data starts), within ``limits``.
    Raises ``ValueError`` (one line) for anything else, ``OSError`` when the file cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        r = _Reader(f, size, limits)
        if r.read(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors = r.count("tensor count", limits.max_tensors)
        n_kv = r.count("metadata count", limits.max_kv)
        if n_tensors == 0:
            raise ValueError("the GGUF file holds no tensors (not a model)")
        meta: dict[str, Any] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("<I")
            meta[key] = r.value(vtype, keep=not key.startswith("tokenizer.ggml."))  # the vocab is skipped
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > limits.max_dims:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            tensors.append(GGUFTensor(name, shape, r.unpack("<I"), r.unpack("<Q")))
        align = meta.get("general.alignment") or 32
        if not isinstance(align, int) or not 1 <= align <= 1 << 20:
            raise ValueError(f"invalid general.alignment {align!r}")
        pos = f.tell()
    return GGUFHeader(meta, tensors, pos + (-pos % align))


def safetensors_tensors(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """(elements, dtype) of every tensor of a safetensors file, from its header only (the
    ``safetensors`` library's parser). Raises ``ValueError`` (one line) for a corrupt file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            out = []
            for k in f.keys():
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= int(d)
                out.append((n, str(sl.get_dtype())))
            return out
    except OSError:
        raise
    except Exception as exc:  # SafetensorError (header length, JSON, offsets) and friends
        raise ValueError(f"not a valid safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
