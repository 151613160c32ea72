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
from typing import Any, Literal

from expert_registry.errors import ModelNotFound, ModelUnreadable
from expert_registry.weights_header import read_gguf_header, safetensors_tensors

Format = Literal["safetensors", "bin", "gguf", "config-only"]

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
                  revision: str | None = None, weights_required: bool = True) -> ModelInfo:
    """Read size, architecture, context length and parameter count of a model without loading it.

    ``weights_required=False`` accepts a folder with a config and no weight files: an expert whose
    engine makes random weights of the real shapes (vLLM ``load_format: dummy``) reads none.

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
    return inspect_folder(root, weights_required)


# --------------------------------------------------------------------------------------------
# transformers folders


def inspect_folder(folder: Path, weights_required: bool = True) -> ModelInfo:
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
    if not st and not bins and weights_required:
        raise ModelUnreadable(f"no *.safetensors or pytorch_model*.bin weights in model folder {folder}")
    files = tuple(st or bins)
    size = sum(p.stat().st_size for p in files)
    if st:
        params: int | None = sum(_safetensors_numel(p) for p in st)
        fmt: Format = "safetensors"
    elif not bins:
        params, fmt = None, "config-only"
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
    """Count parameters from a safetensors header (no tensor data read)."""
    try:
        return sum(n for n, _ in safetensors_tensors(path))
    except (OSError, ValueError) as err:
        raise ModelUnreadable(f"cannot read safetensors header of {path}: {err}") from None


def inspect_gguf(path: Path) -> ModelInfo:
    """Header, metadata and tensor table of a GGUF file (bounded: :mod:`expert_registry.weights_header`);
    checks the tensor data fits in the file."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        header = read_gguf_header(path)
        meta, data_start = header.metadata, header.data_start
        params, end = 0, data_start
        for t in header.tensors:
            numel = t.numel
            params += numel
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
            end = max(end, data_start + t.offset + numel // block * type_size)
        file_size = path.stat().st_size
        if end > file_size:
            raise ValueError(f"tensor data needs {end} bytes but the file has {file_size} (truncated?)")
    except (OSError, ValueError, KeyError, struct.error, RecursionError, MemoryError) as err:
        raise ModelUnreadable(f"cannot read GGUF header/metadata of {path}: {err or type(err).__name__}") from None
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length") if arch else None
    return ModelInfo(size_bytes=file_size, architecture=arch, context_length=int(ctx) if ctx else None,
                     params_estimate=params, format="gguf", path=path, weight_files=(path,),
                     metadata=meta)
