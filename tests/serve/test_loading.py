"""Issue 13 item 4 on the real service (Ray Serve, Redis, the tiny ``hf`` engine): an expert added
with ``coe-registry add`` is ``loading`` with its phase in ``/v1/models`` and ``coe-registry list``,
routed requests meanwhile go to the next-best ready expert, a request that names it waits up to a
bound (``X-Coe-Wait-Timeout``) and then gets 503 + Retry-After, and a start that fails meanwhile
ends the wait with its reason. The slow start is the pool's ``start_delay_s`` hook (conftest's
``SLOW_STARTS``), a real delay before the engine reads its files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
from conftest import SLOW_STARTS, record, wait_until

HELLO = [{"role": "user", "content": "Extract the year from: founded in 1999."}]


def registry_cli(serve_app, *args: str) -> subprocess.CompletedProcess:
    reg = serve_app.registry
    env = {**os.environ, "COE_REDIS_URL": reg.url, "COE_NAMESPACE": reg.namespace, "COE_URL": serve_app.v1,
           "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "expert_registry", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def card(http, name: str) -> dict:
    return {m["id"]: m for m in http.get("/v1/models").json()["data"]}.get(name, {})


def test_added_expert_is_loading_then_ready_and_never_a_surprise(serve_app, http):
    reg = serve_app.registry
    old_map = reg.get_map()
    t_add = time.monotonic()
    r = registry_cli(serve_app, "add", "tiny-slow", "--model", str(serve_app.tiny_dir), "--engine", "hf",
                     "--dtype", "float32", "--max-context", "512", "--max-tokens", "8", "--temperature", "0",
                     "-c", "extraction=0.99", "--tag", "test")
    assert r.returncode == 0, r.stderr
    try:
        # /v1/models: loading, with the engine's phase and how long it has been loading
        c = wait_until(lambda: (lambda c: c if c.get("status") == "loading" and c.get("phase") else None)(
            card(http, "tiny-slow")), SLOW_STARTS["tiny-slow"] - 1, every=0.1,
            what="tiny-slow loading in /v1/models")
        assert c["phase"] == "reading weights" and c["loading_s"] >= 0 and c["tier"] == "disk"
        c0_phase = [c["status"], c["phase"], c["loading_s"]]
        # coe-registry list asks the running service
        listed = registry_cli(serve_app, "list")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if "tiny-slow" in line)
        assert "loading" in row and "status from the service" in listed.stdout, listed.stdout
        as_json = {e["name"]: e for e in json.loads(registry_cli(serve_app, "list", "--json").stdout)}
        assert as_json["tiny-slow"]["service_status"].startswith("loading")
        assert as_json["tiny-slow"]["service_phase"] == "reading weights"

        # a routed request does not wait for it: the next-best ready expert answers, and says why
        reg.update_map({"extraction": ["tiny-slow", "tiny-a"]})
        routed = http.post("/v1/chat/completions", json={"model": "coe/extraction", "messages": HELLO,
                                                         "max_tokens": 2})
        assert routed.status_code == 200, routed.text
        assert routed.headers["x-coe-expert"] == "tiny-a"
        assert routed.headers["x-coe-fallback-from"] == "tiny-slow"
        assert "still loading" in routed.json()["coe"]["fallback_reason"]

        # a request naming it waits as long as it asked, then gets 503 + Retry-After
        t0 = time.monotonic()
        named = http.post("/v1/chat/completions", json={"model": "tiny-slow", "messages": HELLO, "max_tokens": 2},
                          headers={"x-coe-wait-timeout": "0.5"})
        assert named.status_code == 503, named.text
        assert named.json()["error"]["code"] == "expert_loading" and int(named.headers["retry-after"]) >= 1
        assert "still loading (reading weights" in named.json()["error"]["message"]
        assert time.monotonic() - t0 < SLOW_STARTS["tiny-slow"]

        # without the header it waits (limits.loading_wait_s, 120 s) and is answered by the expert itself
        first_token = None
        with httpx.stream("POST", f"{serve_app.v1}/chat/completions", timeout=180,
                          json={"model": "tiny-slow", "messages": HELLO, "max_tokens": 4, "stream": True}) as s:
            assert s.status_code == 200 and s.headers["x-coe-expert"] == "tiny-slow"
            for line in s.iter_lines():
                if first_token is None and '"content":"' in line and '"content":""' not in line:
                    first_token = time.monotonic()
        assert first_token is not None
        print(f"\nadd -> first token through the service (CPU, tiny hf, start held {SLOW_STARTS['tiny-slow']} s): "
              f"{first_token - t_add:.2f} s")
        record("add_to_first_token_service_cpu", {
            "what": "coe-registry add (CLI subprocess) -> first streamed token of a request naming the expert, "
                    "through the real service (Ray Serve, hf engine, tiny model)",
            "start_held_s": SLOW_STARTS["tiny-slow"], "add_to_first_token_s": round(first_token - t_add, 2),
            "phases_seen": c0_phase})
        c = wait_until(lambda: (lambda c: c if c.get("status") == "ready" else None)(card(http, "tiny-slow")), 10,
                       every=0.1, what="tiny-slow ready")
        assert c["tier"] in ("dram", "hbm") and "phase" not in c
        assert "loading" not in next(line for line in registry_cli(serve_app, "list").stdout.splitlines()
                                     if "tiny-slow" in line)
    finally:
        reg.set_map(old_map)
        reg.remove("tiny-slow", force=True)


def test_a_start_that_fails_while_a_request_waits_ends_the_wait_with_the_reason(serve_app, http, tmp_path):
    reg = serve_app.registry
    gone = tmp_path / "tiny-vanish"
    shutil.copytree(serve_app.tiny_dir, gone)
    reg.add(serve_app.tiny_expert("tiny-vanish").model_copy(update={"model": str(gone)}))
    try:
        wait_until(lambda: card(http, "tiny-vanish").get("status") == "loading", SLOW_STARTS["tiny-vanish"] - 1,
                   every=0.1, what="tiny-vanish loading")
        shutil.rmtree(gone)  # the files vanish while the engine start is under way
        t0 = time.monotonic()
        r = http.post("/v1/chat/completions", json={"model": "tiny-vanish", "messages": HELLO, "max_tokens": 2})
        waited = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "expert_load_failed" and "tiny-vanish" in r.json()["error"]["message"]
        assert waited < 30  # the start's failure ended the wait, not the 120 s bound
        assert wait_until(lambda: reg.get("tiny-vanish").status == "failed", 10, every=0.1, what="tiny-vanish failed in the registry")
        assert reg.get("tiny-vanish").status_reason
        assert card(http, "tiny-vanish")["status"] == "failed"
    finally:
        reg.remove("tiny-vanish", force=True)
