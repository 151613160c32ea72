"""A new user's first run, measured: fresh clone -> `make setup` -> `coe serve --demo` with an empty
COE_HOME, in a real terminal (tmux), to the "coe is serving" banner, one `coe chat` as the banner
prints it, then Ctrl-C. Writes the figures (JSON) and the screen (text) for README and docs/serving.md.

    flock /tmp/coe-heavy.lock timeout 1500 python3 bench/first_run.py --repo . \
        --out bench/results/first-run-cpu-2026-11-29.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def _tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30).stdout


def _screen(sock: str) -> str:
    return _tmux(sock, "capture-pane", "-p", "-J", "-S", "-3000", "-t", "t")


def _wait_for(sock: str, text: str, timeout: float) -> float:
    t0 = time.monotonic()
    while text not in _screen(sock):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{text!r} not shown in {timeout:.0f} s:\n{_screen(sock)}")
        time.sleep(0.5)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".", help="the checkout to clone")
    ap.add_argument("--clone", default="/tmp/fresh-ux")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    clone, home = Path(a.clone), Path(tempfile.mkdtemp(prefix="coe-first-"))
    shutil.rmtree(clone, ignore_errors=True)
    res: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
                 "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    commit = subprocess.run(["git", "-C", a.repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    res["commit"] = commit
    t0 = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(Path(a.repo).resolve()), str(clone)], check=True)
    res["clone_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    setup = subprocess.run(["make", "setup"], cwd=clone, capture_output=True, text=True, timeout=1200)
    res["setup_s"] = round(time.monotonic() - t0, 1)
    res["setup_rc"] = setup.returncode
    res["setup_stages"] = re.findall(r"\[(\d/\d)\] (.*)\n\s+done in (\d+) s; \.venv is now (\S+)", setup.stdout)
    res["venv_bytes"] = _du_bytes(clone / ".venv")
    Path(a.out).with_suffix(".setup.txt").write_text(setup.stdout + setup.stderr)
    if setup.returncode:
        raise SystemExit(setup.stderr[-2000:])

    sock, port, dash = f"coe-first-{os.getpid()}", _free_port(), _free_port()
    cmd = (f"cd {clone} && env COE_HOME={home} .venv/bin/coe serve --demo --port {port} --dashboard-port {dash};"
           f" echo EXITED-$?; sleep 900")
    _tmux(sock, "new-session", "-d", "-s", "t", "-x", "110", "-y", "50", cmd)
    try:
        res["serve_to_banner_s"] = round(_wait_for(sock, "coe is serving", 900), 1)
        screen = _screen(sock)
        m = re.search(r"try\s+(.+ chat .*\"Hello!\")", screen)
        t1 = time.monotonic()
        chat = subprocess.run(["env", "-i", "HOME=/tmp", "PATH=/usr/bin:/bin", "bash", "--norc", "-c", m.group(1)],
                              capture_output=True, text=True, timeout=300)
        res["first_chat_s"] = round(time.monotonic() - t1, 2)
        res["first_chat_rc"] = chat.returncode
        res["first_chat_stdout"] = chat.stdout[-600:]
        _tmux(sock, "send-keys", "-t", "t", "C-c")
        res["stop_s"] = round(_wait_for(sock, "EXITED-", 120), 1)
        res["total_first_run_s"] = round(res["clone_s"] + res["setup_s"] + res["serve_to_banner_s"], 1)
        res["coe_home_bytes"] = _du_bytes(home)
        Path(a.out).with_suffix(".screen.txt").write_text(_screen(sock))
    finally:
        _tmux(sock, "kill-server")
        subprocess.run(["env", f"COE_HOME={home}", str(clone / ".venv/bin/coe-registry"), "server", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
