"""Finding 8 of issue 12: a GGUF with deeply nested metadata crashed ``coe-registry add`` with a
``RecursionError`` traceback, an 80 MB one took ~700 MB and 40 s and was accepted with zero
tensors; slow clients were never timed out.

The GGUF replays run the real CLI against the session's Redis; the slow-client replay opens a raw
socket to the real service and stalls mid-body."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

_U32, _U64, _ARRAY, _STRING = "<I", "<Q", 9, 8


def _gguf(path: Path, n_tensors: int, kv: bytes, n_kv: int) -> Path:
    path.write_bytes(b"GGUF" + struct.pack(_U32, 3) + struct.pack(_U64, n_tensors) + struct.pack(_U64, n_kv) + kv)
    return path


def _key(name: str) -> bytes:
    return struct.pack(_U64, len(name)) + name.encode()


def nested(path: Path, depth: int) -> Path:
    """One metadata value: an array of an array of … (``depth`` levels), 1 item each."""
    body = _key("evil.nested") + struct.pack(_U32, _ARRAY)
    for _ in range(depth):
        body += struct.pack(_U32, _ARRAY) + struct.pack(_U64, 1)
    body += struct.pack(_U32, 4) + struct.pack(_U64, 1) + struct.pack(_U32, 7)  # innermost: [7]
    return _gguf(path, 1, body, 1)


def wide(path: Path, items: int) -> Path:
    """One metadata value: an array of ``items`` empty arrays (the 80 MB file of the report)."""
    body = _key("evil.wide") + struct.pack(_U32, _ARRAY) + struct.pack(_U32, _ARRAY) + struct.pack(_U64, items)
    body += (struct.pack(_U32, 4) + struct.pack(_U64, 0)) * items
    return _gguf(path, 1, body, 1)


def _add(serve_app, redis_url, model: Path) -> tuple[subprocess.CompletedProcess, float, int]:
    env = {**os.environ, "COE_REDIS_URL": redis_url, "COE_NAMESPACE": serve_app.registry.namespace}
    # the CLI's own peak RSS, sampled every 10 ms (getrusage is no use here: RUSAGE_CHILDREN keeps
    # the largest child this test process ever waited for, and a child's own ru_maxrss starts from
    # the forking parent's high-water mark, which Linux keeps across exec)
    import psutil

    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "expert_registry", "add", "hostile", "--model", str(model),
                             "-c", "general=0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None and time.monotonic() - t0 < 120:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=120)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out, time.monotonic() - t0, peak // 1024


@pytest.mark.parametrize("make", [lambda p: nested(p, 100_000), lambda p: wide(p, 6_000_000),
                                  lambda p: _gguf(p, 0, b"", 0)], ids=["deeply-nested", "80MB-wide", "no-tensors"])
def test_hostile_gguf_is_refused_with_one_line(serve_app, redis_url, tmp_path, make):
    model = make(tmp_path / "hostile.gguf")
    out, seconds, rss_kb = _add(serve_app, redis_url, model)
    assert out.returncode == 2, (out.stdout, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "RecursionError" not in out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "GGUF" in lines[0]
    assert seconds < 15, seconds  # was 40 s for the wide file
    assert rss_kb < 600 * 1024, rss_kb  # peak of the CLI process (Python + imports ≈ 250 MB); was ~700 MB more
    assert not serve_app.registry.exists("hostile")


def test_a_stalled_body_gets_408(serve_app):
    host, port = serve_app.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"tiny-a\", ")
        t0 = time.monotonic()
        reply = s.recv(4096)
        waited = time.monotonic() - t0
        while chunk := s.recv(4096):  # the server closes the connection after the body
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply and 5 < waited < 30, waited
