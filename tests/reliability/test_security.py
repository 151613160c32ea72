"""API keys in use, log redaction, the bind warning and "nothing is unpickled or executed".

Service-level checks (401 through the running app) are in test_service.py; these run without Ray,
against the real middleware and the real key ring (keys in the session's Redis) inside a real
FastAPI app served over ASGI. How keys are stored is tested in tests/api/test_keys.py."""

from __future__ import annotations

import ast
import json
import logging
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from coe import security
from coe.keys import KeyRing, RedisKeyStore, new_key
from coe.security import APIKeyMiddleware, check_bind, redact

REPO = Path(__file__).resolve().parents[2]


def _app(store: KeyRing) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    @app.get("/metrics")
    async def metrics():
        return {"ok": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    app.add_middleware(APIKeyMiddleware, store=store)
    return app


async def _get(app, path, key=None, method="GET"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, headers=headers)


async def test_bearer_required_everywhere_but_the_probes_once_keys_exist(redis_url):
    store = RedisKeyStore(redis_url, f"sec-{uuid.uuid4().hex[:8]}")
    app = _app(KeyRing(store, env={}, refresh_s=0))
    assert (await _get(app, "/v1/models")).status_code == 200  # no keys configured: open
    user, _ = store.add("user1")
    other, _ = store.add("user2")
    r = await _get(app, "/v1/models")  # no key sent: "missing", not "invalid" (issue 31 item 2)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.json()["error"]["message"].startswith("missing API key")
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = await _get(app, "/v1/models", "coe-wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert (await _get(app, "/v1/models", user[:-1])).status_code == 401
    assert (await _get(app, "/v1/models", user)).status_code == 200
    assert (await _get(app, "/metrics", user)).status_code == 200  # every key may call every route
    assert (await _get(app, "/metrics")).status_code == 401  # deny by default, not only /v1
    assert (await _get(app, "/healthz")).status_code == 200  # probes stay open
    store.remove("user1")  # revoking takes effect without a restart
    assert (await _get(app, "/v1/models", user)).status_code == 401
    assert (await _get(app, "/v1/models", other)).status_code == 200


async def test_env_keys_are_hashed_in_memory():
    ring = KeyRing(None, env={"COE_API_KEYS": "k-one, k-two"})
    assert ring.configured and ring.verify("k-two") is not None
    assert ring.verify("k-three") is None and ring.verify("") is None
    assert all("k-one" not in r.model_dump_json() for r in ring.records)
    app = _app(ring)
    assert (await _get(app, "/v1/models", "k-one")).status_code == 200


def test_redact_removes_secrets():
    line = ("POST /v1/chat Authorization: Bearer coe-AbCdEfGhIjKlMnOpQrStUv123 api_key=sk-abcdefghijklmnopqrstu "
            "redis://:hunter2@redis:6379/0 password=swordfish token: hf_ABCDEFGHIJKLMNOPQRST")
    out = redact(line)
    for secret in ("coe-AbCdEfGhIjKlMnOpQrStUv123", "sk-abcdefghijklmnopqrstu", "hunter2", "swordfish",
                   "hf_ABCDEFGHIJKLMNOPQRST"):
        assert secret not in out
    assert "/v1/chat" in out and "redis:6379/0" in out
    assert redact("nothing secret here") == "nothing secret here"


def test_log_records_are_redacted(caplog):
    security.install_log_redaction()
    key = new_key()
    with caplog.at_level(logging.INFO):
        logging.getLogger("coe.test").info("client sent %s", f"Bearer {key}")
    assert key not in caplog.text and "Bearer ***" in caplog.text


def test_check_bind_warns_beyond_loopback_without_keys():
    seen = []
    assert check_bind("127.0.0.1", False) is None
    assert check_bind("::1", False) is None and check_bind("localhost", False) is None
    assert check_bind("0.0.0.0", True) is None
    msg = check_bind("0.0.0.0", False, seen.append)
    assert msg and "NO API KEY" in msg and seen == [msg]
    assert check_bind("10.1.2.3", False)


# ------------------------------------------------------------------ nothing unpickled or executed
_FORBIDDEN_CALLS = {("pickle", "load"), ("pickle", "loads"), ("joblib", "load"), ("dill", "load"),
                    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "loads"), ("yaml", "load"),
                    ("yaml", "unsafe_load")}


def test_no_unpickling_or_eval_in_coe_routers_registry():
    """Static guard: none of the three packages unpickles, evals or loads YAML unsafely; numpy loads
    pass allow_pickle=False; torch.load (if ever used) passes weights_only=True."""
    problems = []
    for pkg in ("coe", "routers", "expert_registry"):
        for f in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text(), str(f))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                    if any(n and n.split(".")[0] in ("pickle", "joblib", "dill", "cloudpickle") for n in names):
                        problems.append(f"{f.relative_to(REPO)}:{node.lineno} imports a pickle library")
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func
                if isinstance(fn, ast.Name) and fn.id in ("eval", "exec"):
                    problems.append(f"{f.relative_to(REPO)}:{node.lineno} calls {fn.id}()")
                if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
                    pair = (fn.value.id, fn.attr)
                    kw = {k.arg: k.value for k in node.keywords}
                    if pair in _FORBIDDEN_CALLS:
                        problems.append(f"{f.relative_to(REPO)}:{node.lineno} calls {'.'.join(pair)}")
                    if pair == ("np", "load") or pair == ("numpy", "load"):
                        v = kw.get("allow_pickle")
                        if not (isinstance(v, ast.Constant) and v.value is False):
                            problems.append(f"{f.relative_to(REPO)}:{node.lineno} np.load without allow_pickle=False")
                    if pair == ("torch", "load"):
                        v = kw.get("weights_only")
                        if not (isinstance(v, ast.Constant) and v.value is True):
                            problems.append(f"{f.relative_to(REPO)}:{node.lineno} torch.load without weights_only=True")
    assert not problems, "\n".join(problems)


def test_router_artifacts_are_json_and_npz_only(tmp_path):
    """A saved router folder holds no pickle; loading one that has a pickle planted in place of its
    arrays fails instead of unpickling it."""
    import numpy as np

    from routers.classifier import CategoryClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 8)).astype(np.float32)
    y = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    clf = CategoryClassifier.fit(X, y, ["a", "b", "c"])
    out = tmp_path / "clf"
    out.mkdir()
    clf.save(out)
    suffixes = {p.suffix for p in out.iterdir()}
    assert suffixes <= {".json", ".npz", ".safetensors"}, suffixes
    # plant an object array (needs pickle to load) where the weights go
    np.savez(out / "classifier.npz", coef=np.array([{"evil": 1}], dtype=object), intercept=np.zeros(3))
    with pytest.raises(Exception) as e:
        CategoryClassifier.load(out)
    assert "pickle" in str(e.value).lower() or "Object arrays" in str(e.value) or e.type.__name__ == "ArtifactError"


async def test_remote_code_is_not_executed_unless_the_expert_opts_in(tmp_path):
    """A model folder whose config points at custom code: with trust_remote_code off (the default)
    the load fails with a clear reason and the code never runs."""
    from coe.engines import create_engine
    from coe.errors import ExpertLoadError
    from expert_registry.spec import Expert

    marker = tmp_path / "pwned"
    folder = tmp_path / "evil-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil-custom", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (folder / "configuration_evil.py").write_text(payload)
    (folder / "modeling_evil.py").write_text(payload)
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(folder / "model.safetensors"))
    expert = Expert(name="evil", model=str(folder), engine="hf", dtype="float32")
    assert expert.trust_remote_code is False
    engine = create_engine(expert, device="cpu")
    with pytest.raises(ExpertLoadError) as e:
        await engine.load()
    assert "evil" in str(e.value)
    assert not marker.exists(), "custom model code was executed"


def test_model_paths_are_resolved_and_checked(tmp_path):
    from coe.engines.sources import resolve_source

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    src = resolve_source(str(tmp_path / "real" / ".." / "link"))
    assert src.kind == "folder" and src.path == str((tmp_path / "real").resolve())
    from expert_registry.errors import ModelNotFound

    for missing in (tmp_path / "missing.gguf", tmp_path / "nope" / "model"):
        with pytest.raises((FileNotFoundError, ModelNotFound)) as e:
            resolve_source(str(missing))
        assert str(missing) in str(e.value)  # the message names the path
