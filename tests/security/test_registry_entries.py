"""Finding 5 of issue 12: whoever can write the registry could run code in the pool, and one
malformed entry stopped the service from reading the whole registry.

Replays against the real service: an entry with ``trust_remote_code: true`` whose model folder
carries Python that would leave a marker file when imported is refused (the service has not opted
in), and the marker never appears; the CLI warns when an entry asks for remote code; malformed
entries and an entry whose key and ``name`` differ are skipped and reported, the rest keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from security_helpers import HELLO, err, wait

pytestmark = pytest.mark.timeout(300)


def test_remote_code_needs_the_service_to_opt_in(serve_app, http, tmp_path):
    reg = serve_app.registry
    folder = tmp_path / "evil-model"
    shutil.copytree(serve_app.tiny_dir, folder)
    marker = tmp_path / "pwned"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        t = json.loads(tok_cfg.read_text())
        t["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        tok_cfg.write_text(json.dumps(t))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n")
    reg.add(serve_app.tiny_expert("evil").model_copy(update={"model": str(folder), "trust_remote_code": True}))
    try:
        r = wait(lambda: (r := http.post("/v1/chat/completions", json={"model": "evil", "messages": HELLO,
                                                                          "max_tokens": 2})).status_code != 404 and r,
                 15, what="the service to see the new expert")
        assert r.status_code == 503, r.text
        assert "allow_remote_code" in err(r)["message"]
        spec = wait(lambda: (e := reg.get("evil")).status == "failed" and e, 10, what="status=failed")
        assert "allow_remote_code" in spec.status_reason
        assert not marker.exists(), "the model folder's Python ran"
    finally:
        reg.remove("evil", force=True)


def test_cli_warns_when_an_entry_asks_for_remote_code(serve_app, redis_url, tmp_path):
    env = {**os.environ, "COE_REDIS_URL": redis_url, "COE_NAMESPACE": serve_app.registry.namespace}
    out = subprocess.run([sys.executable, "-m", "expert_registry", "add", "remote-one", "--model",
                          str(serve_app.tiny_dir), "--trust-remote-code", "-c", "general=0.1"],
                         env=env, capture_output=True, text=True, timeout=120)
    try:
        assert out.returncode == 0, out.stderr
        assert "trust_remote_code" in out.stderr and "allow_remote_code" in out.stderr
    finally:
        serve_app.registry.remove("remote-one", force=True)


def test_malformed_entries_are_skipped_and_reported(serve_app, http, redis_url):
    import redis

    reg = serve_app.registry
    raw = redis.Redis.from_url(redis_url)
    good = reg.get("tiny-a").model_dump_json()
    raw.hset(reg.k_experts, mapping={"zz-not-json": "{half", "zz-alias": good})  # key != name: listed twice before
    raw.incr(reg.k_version)
    try:
        def reported():
            h = http.get("/healthz").json()
            return set(h["registry"]["invalid_entries"]) == {"zz-not-json", "zz-alias"} and h
        h = wait(reported, 20, what="/healthz to report the bad entries")
        assert h["registry"]["reachable"] and h["status"] == "ok"  # not "Redis unreachable"
        assert "names itself 'tiny-a'" in h["registry"]["invalid_entries"]["zz-alias"]
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids.count("tiny-a") == 1 and "zz-alias" not in ids and "zz-not-json" not in ids
        assert "coe_registry_invalid_entries 2.0" in http.get("/metrics").text
        r = http.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200, r.text
        env = {**os.environ, "COE_REDIS_URL": redis_url, "COE_NAMESPACE": reg.namespace}
        out = subprocess.run([sys.executable, "-m", "expert_registry", "list"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "zz-not-json" in out.stderr and "zz-alias" in out.stderr and "tiny-a" in out.stdout
    finally:
        raw.hdel(reg.k_experts, "zz-not-json", "zz-alias")
        raw.incr(reg.k_version)
        raw.close()
