"""Find an expert's model on disk and read what it is, without loading any weights.

Used by ``coe-registry add`` (to refuse a model that cannot be served and to record its size)
and by the engines (to pick a loader and size the memory tiers). Three kinds of model:

* a folder with ``config.json`` and ``*.safetensors`` (or ``pytorch_model*.bin``) weights;
* a ``.gguf`` file (or a folder / hub repo plus ``gguf_file``): only the header and the tensor
  table are read, not the tensor data;
* a hub id (``org/name``): accepted only when ``HF_HUB_OFFLINE`` is not set and the snapshot
  is already in the local Hugging Face cache (coe never downloads at run time).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from expert_registry.errors import ModelNotFound, ModelUnreadable

Format = Literal["safetensors", "bin", "gguf"]

# Keys of a transformers config that hold the context length, most specific first.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                 "max_sequence_length")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}
_ST_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16,
                  "I8": 8, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`inspect_model` found. ``path`` is the local file/folder the engine should load
    (for GGUF: the .gguf file itself)."""

    size_bytes: int
    architecture: str | None
    context_length: int | None
    params_estimate: int | None
    format: Format
    path: Path
    weight_files: tuple[Path, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def params_b(self) -> float | None:
        """Parameters in billions, rounded to 3 decimals (as the spec stores it)."""
        return None if self.params_estimate is None else round(self.params_estimate / 1e9, 3)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _looks_like_path(model: str) -> bool:
    """Something the user meant as a path: a hub id is ``name`` or ``org/name``, never ``./x``,
    ``/x``, ``~/x``, ``a/b/c`` or ``x.gguf``."""
    return (model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model
            or model.lower().endswith((".gguf", ".safetensors", ".bin", ".json")))


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """The local path of ``model``: itself if it exists, else the cached hub snapshot.
    Raises :class:`ModelNotFound` with the reason hub ids are not accepted right now."""
    p = Path(model).expanduser()
    if p.exists():
        return p.resolve()
    if _looks_like_path(model):
        raise ModelNotFound(f"model path does not exist: {model}")
    if _hub_offline():
        raise ModelNotFound(
            f"model {model!r} is not a local path, and hub ids are not accepted while HF_HUB_OFFLINE is set"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means "not in the local cache"
        raise ModelNotFound(
            f"model {model!r} is neither a local path nor a hub id in the local Hugging Face cache "
            f"({type(err).__name__}); download it first (e.g. `hf download {model}`)"
        ) from None


def inspect_model(model: str | os.PathLike[str], gguf_file: str | None = None,
                  revision: str | None = None) -> ModelInfo:
    """Read size, architecture, context length and parameter count of a model without loading it.

    Raises :class:`ModelNotFound` (nothing there) or :class:`ModelUnreadable` (found, but the
    config / GGUF header cannot be read or no weights are present)."""
    root = resolve_model_path(str(model), revision)
    if root.is_file():
        if gguf_file and Path(gguf_file).name != root.name:
            raise ModelUnreadable(f"gguf_file {gguf_file!r} given but model is the file {root}")
        return inspect_gguf(root)
    if gguf_file:
        target = root / gguf_file
        if not target.is_file():
            raise ModelNotFound(f"GGUF file does not exist: {target}")
        return inspect_gguf(target)
    return inspect_folder(root)


# --------------------------------------------------------------------------------------------
# transformers folders


def inspect_folder(folder: Path) -> ModelInfo:
    """A transformers model folder: config.json + safetensors (preferred) or .bin weights."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass gguf_file)" if ggufs else ""
        raise ModelUnreadable(f"no config.json in model folder {folder}{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise ModelUnreadable(f"cannot read {cfg_path}: {err}") from None
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    st = sorted(folder.glob("*.safetensors"))
    bins = sorted(p for p in folder.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
    if not st and not bins:
        raise ModelUnreadable(f"no *.safetensors or pytorch_model*.bin weights in model folder {folder}")
    files = tuple(st or bins)
    size = sum(p.stat().st_size for p in files)
    if st:
        params: int | None = sum(_safetensors_numel(p) for p in st)
        fmt: Format = "safetensors"
    else:
        dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
        params = size // _DTYPE_BYTES.get(dt, 4)
        fmt = "bin"
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else cfg.get("model_type")
    ctx = next((int(c[k]) for c in (cfg, text_cfg) for k in _CONTEXT_KEYS
                if isinstance(c.get(k), int) and c[k] > 0), None)
    return ModelInfo(size_bytes=size, architecture=arch, context_length=ctx, params_estimate=params,
                     format=fmt, path=folder, weight_files=files, metadata={"config": cfg})


def _safetensors_numel(path: Path) -> int:
    """Count parameters from a safetensors header (8-byte length + JSON); no tensor data read."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000 or n > path.stat().st_size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        total = 0
        for key, t in header.items():
            if key == "__metadata__":
                continue
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
            total += numel
        return total
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise ModelUnreadable(f"cannot read safetensors header of {path}: {err}") from None


# --------------------------------------------------------------------------------------------
# GGUF
#
# We parse the header ourselves with the gguf package's type tables instead of GGUFReader:
# GGUFReader builds numpy views for every metadata item (49k tokenizer strings for SmolLM2),
# which takes seconds; this reader skips arrays it does not need and takes milliseconds.

_GGUF_MAGIC = b"GGUF"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("file ends inside the header (truncated?)")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise ValueError(f"string length {n} exceeds the file size (truncated or corrupt?)")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if count > self.size:
                raise ValueError(f"array length {count} exceeds the file size (truncated or corrupt?)")
            if itype in _SCALAR and not keep:  # skip fixed-size arrays in one seek
                self.f.seek(count * struct.calcsize(_SCALAR[itype]), os.SEEK_CUR)
                return None
            items = [self.value(itype, keep) for _ in range(count)]
            return items if keep else None
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]], int]:
    """(metadata without large arrays, tensors as (name, shape, ggml_type, offset), data_start)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        r = _Reader(f, size)
        if r.read(4) != _GGUF_MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        if n_tensors > size or n_kv > size:
            raise ValueError("tensor/metadata counts exceed the file size (truncated or corrupt?)")
        meta: dict[str, Any] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("<I")
            # keep small arrays (e.g. languages); the tokenizer vocab is skipped
            meta[key] = r.value(vtype, keep=not key.startswith("tokenizer.ggml."))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            shape = [r.unpack("<Q") for _ in range(n_dims)]
            tensors.append((name, shape, r.unpack("<I"), r.unpack("<Q")))
        align = int(meta.get("general.alignment") or 32)
        pos = f.tell()
        data_start = pos + (-pos % align)
    return meta, tensors, data_start


def inspect_gguf(path: Path) -> ModelInfo:
    """Header, metadata and tensor table of a GGUF file; checks the tensor data fits in the file."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        meta, tensors, data_start = read_gguf_header(path)
        params, end = 0, data_start
        for name, shape, ttype, offset in tensors:
            numel = 1
            for d in shape:
                numel *= d
            params += numel
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            end = max(end, data_start + offset + numel // block * type_size)
        file_size = path.stat().st_size
        if end > file_size:
            raise ValueError(f"tensor data needs {end} bytes but the file has {file_size} (truncated?)")
    except (OSError, ValueError, KeyError, struct.error) as err:
        raise ModelUnreadable(f"cannot read GGUF header/metadata of {path}: {err}") from None
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length") if arch else None
    return ModelInfo(size_bytes=file_size, architecture=arch, context_length=int(ctx) if ctx else None,
                     params_estimate=params, format="gguf", path=path, weight_files=(path,),
                     metadata=meta)
