"""Finding 6 of issue 12: a ``seed`` >= 2^64 gave a 500 whose body was the full Ray traceback (pid,
node IP, actor id, file paths), and ``status_reason`` in ``/v1/models`` showed server paths.

Replays against the real service, plus the 500 path itself on the real ingress app in-process (no
request reaches an unexpected exception in the real service any more, which is the point)."""

from __future__ import annotations

import json

import httpx
import pytest

from security_helpers import HELLO, err, wait

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("seed,status", [(2**64, 400), (2**63, 400), (-(2**63) - 1, 400), (10**40, 400),
                                         (2**63 - 1, 200), (-(2**63), 200), (0, 200)])
def test_seed_is_a_signed_64_bit_integer(http, seed, status):
    r = http.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HELLO, "max_tokens": 2,
                                               "temperature": 0.7, "seed": seed})
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    if status == 400:
        e = err(r)
        assert e["param"] == "seed" and "Traceback" not in r.text


def test_other_fields_have_ranges(http):
    for body in ({"model": "x" * 300, "messages": HELLO}, {"model": "tiny-a", "messages": HELLO, "n": 10**20},
                 {"model": "tiny-a", "messages": HELLO, "max_tokens": 2**40},
                 {"model": "tiny-a", "messages": [{"role": "user", "content": "hi", "name": "n" * 1000}]}):
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text[:200])


def test_status_reasons_and_load_errors_carry_no_server_paths(serve_app, http, tmp_path):
    reg = serve_app.registry
    bad = tmp_path / "secret-layout" / "broken-model"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (bad / "model.safetensors").write_bytes(b"\x00\x00\x00\x00\x00\x00\x00\x10not a safetensors file")
    reg.add(serve_app.tiny_expert("leaky").model_copy(update={"model": str(bad)}))
    try:
        r = wait(lambda: (r := http.post("/v1/chat/completions", json={
            "model": "leaky", "messages": HELLO, "max_tokens": 2})).status_code == 503 and r, 20,
            what="the broken expert to fail")
        assert str(tmp_path) not in r.text and "secret-layout" not in r.text, r.text
        card = wait(lambda: (c := {m["id"]: m for m in http.get("/v1/models").json()["data"]}["leaky"])["status"]
                    == "failed" and c, 10, what="/v1/models to show the failure")
        assert card["status_reason"] and "secret-layout" not in card["status_reason"], card
        assert "safetensors" in card["status_reason"]  # still says what is wrong
        assert "secret-layout" in reg.get("leaky").status_reason  # operators keep the full reason
    finally:
        reg.remove("leaky", force=True)


async def test_a_500_says_only_a_generic_message_and_the_request_id(caplog):
    """The real ingress app's handlers and middlewares, with a route that raises what a Ray task
    error looks like (pid, IP, path); the body names only the request id, the log has the rest."""
    from coe.serve.ingress import app

    @app.get("/_test_boom")
    async def boom():
        raise RuntimeError("ray::ExpertPool.generate() (pid=4242, ip=10.1.2.3, actor_id=abc) "
                           "File \"/srv/coe/secret/pool.py\", line 12")

    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/_test_boom", headers={"x-request-id": "abc-123"})
    finally:
        app.router.routes[:] = [rt for rt in app.router.routes if getattr(rt, "path", "") != "/_test_boom"]
    assert r.status_code == 500
    e = err(r)
    assert r.headers["x-request-id"] == "abc-123" and "abc-123" in e["message"]
    for leak in ("pid=4242", "10.1.2.3", "actor_id", "/srv/coe", "RuntimeError", "Traceback"):
        assert leak not in r.text
    assert "abc-123" in caplog.text and "pid=4242" in caplog.text  # the log keeps the details
