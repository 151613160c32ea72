"""Small helpers for the registry tests (kept out of conftest: only these tests use them)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from typer.testing import CliRunner

from expert_registry.cli import app
from expert_registry.store import RedisRegistry

REPO = Path(__file__).resolve().parents[2]


def make_model_folder(path: Path, config: dict | None = None) -> Path:
    """A minimal transformers-style folder: config.json + one small (valid) safetensors file."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = config or {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "max_position_embeddings": 4096}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({"w": np.zeros((4, 8), dtype=np.float32), "b": np.zeros(8, dtype=np.float32)},
              str(path / "model.safetensors"))
    return path


def make_truncated_gguf(src: Path, dest: Path, keep: int = 4096) -> Path:
    """The first ``keep`` bytes of a real GGUF: valid magic, header cut short."""
    with src.open("rb") as f:
        dest.write_bytes(f.read(keep))
    return dest


def make_garbage_gguf(dest: Path) -> Path:
    dest.write_bytes(b"NOPE" + struct.pack("<I", 3) + os.urandom(64))
    return dest


def cli(reg: RedisRegistry, *args: str):
    """Run coe-registry in-process against ``reg``'s Redis and namespace."""
    result = CliRunner().invoke(app, [*args, "--redis-url", reg.url, "--namespace", reg.namespace])
    return result


def state(reg: RedisRegistry):
    """Everything a bad command must leave untouched."""
    snap = reg.snapshot()
    return snap.version, {n: e.model_dump() for n, e in snap.experts.items()}, snap.category_map


def run_py(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (a real second process) from the repo root."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def popen_py(code: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
