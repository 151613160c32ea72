"""Ray's own output while `coe serve` starts or stops goes to a log file without ANSI codes, not to
the user's terminal (or to a file the user redirected coe's output to)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

CODE = r"""
import os, sys
from coe.cli import _ray_output_to_log
print("before", flush=True)
with _ray_output_to_log(fds=(1, 2)):
    os.write(1, b"\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed\n")
    os.write(2, b"INFO worker.py -- View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m\n")
print("after", flush=True)
"""


def test_ray_output_goes_to_the_log_without_ansi_codes():
    home = tempfile.mkdtemp(prefix="coe-log-")
    res = subprocess.run([sys.executable, "-c", CODE], env={**os.environ, "COE_HOME": home},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "before\nafter\n" and res.stderr == ""  # nothing of Ray's reached the user
    log = (Path(home) / "logs" / "serve.log").read_text()
    assert "graceful_shutdown failed" in log and "http://127.0.0.1:8265" in log
    assert "\x1b[" not in log


LIVE = r"""
import os, sys, time
from pathlib import Path
from coe.cli import _ray_output_to_log
log = Path(os.environ["COE_HOME"]) / "logs" / "serve.log"
with _ray_output_to_log(fds=(1, 2)):
    os.write(2, b"\x1b[33m(raylet)\x1b[0m a notice while Ray starts\n")
    deadline = time.monotonic() + 10
    while not (log.exists() and "a notice while Ray starts" in log.read_text()):
        assert time.monotonic() < deadline, "not in serve.log while the capture runs"
        time.sleep(0.05)
print("seen", flush=True)
"""


def test_the_log_is_written_as_ray_prints_not_when_the_capture_ends():
    """Issue 31 item 6: the file the banner names is current while coe starts (and serves)."""
    home = tempfile.mkdtemp(prefix="coe-log-")
    res = subprocess.run([sys.executable, "-c", LIVE], env={**os.environ, "COE_HOME": home},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "seen\n", (res.stdout, res.stderr)
    log = (Path(home) / "logs" / "serve.log").read_text()
    assert log.count("a notice while Ray starts") == 1 and "\x1b[" not in log, log
