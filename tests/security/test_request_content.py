"""Finding 1 of issue 12: a 126-byte request took every expert out of service.

The tokenizer's error on a lone surrogate was handled as an expert failure: the expert was marked
``failed`` in the registry, the fallback tried the next candidate and marked it too. These replays
run against the real service; they fail without the fix (503 and ``failed`` experts)."""

from __future__ import annotations

import pytest

from security_helpers import HELLO, err, wait

pytestmark = pytest.mark.timeout(300)

# the request of the report (the JSON escape is ASCII, so the body is valid UTF-8)
ATTACK = (b'{"model":"coe/math","messages":[{"role":"system","content":"\\udfff"},'
          b'{"role":"user","content":"What is 2+2?"}]}')


def _statuses(serve_app) -> dict[str, str]:
    return {e.name: e.status for e in serve_app.registry.list()}


def test_lone_surrogate_is_a_400_and_no_expert_changes(serve_app, http):
    before = _statuses(serve_app)
    for _ in range(3):
        r = http.post("/v1/chat/completions", content=ATTACK, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        e = err(r)
        assert e["code"] == "invalid_encoding" and e["param"] == "messages[0].content"
    # also in a key, a stop sequence, a streamed request and the routing endpoint
    for body in (b'{"model":"coe","messages":[{"role":"user","content":"hi","\\ud800x":1}]}',
                 b'{"model":"tiny-a","messages":[{"role":"user","content":"hi"}],"stop":["\\udc00"]}',
                 b'{"model":"coe","stream":true,"messages":[{"role":"user","content":"a\\ud83d"}]}'):
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and err(r)["code"] == "invalid_encoding", r.text
    r = http.post("/v1/route", content=ATTACK, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    # a valid surrogate *pair* (an emoji) is ordinary text
    ok = b'{"model":"tiny-b","max_tokens":2,"messages":[{"role":"user","content":"\\ud83d\\ude00 2+2?"}]}'
    assert http.post("/v1/chat/completions", content=ok, headers={"content-type": "application/json"}).status_code == 200
    assert _statuses(serve_app) == before
    r = http.post("/v1/chat/completions", json={"model": "coe/math", "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200 and "x-coe-fallback-from" not in r.headers, r.text


def test_template_failure_is_a_400_for_that_request_only(serve_app, http):
    """An error raised while templating one request (here the expert's own template refuses a
    conversation) reaches the pool: it is a 400 ``invalid_prompt``, with no fallback to another
    expert, and the expert stays ``ready`` and serves the next request."""
    reg = serve_app.registry
    template = ("{% for m in messages %}{% if 'forbidden' in m['content'] %}"
                "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    old_map = reg.get_map()
    reg.add(serve_app.tiny_expert("strict", math=1.0).model_copy(update={"chat_template": template}))
    reg.set_map({**old_map, "math": ["strict", "tiny-b"]})
    try:
        wait(lambda: http.post("/v1/route", json={"model": "coe/math", "messages": HELLO}).json()["coe"]["expert"]
             == "strict", 15, what="the router to pick the new expert")
        bad = [{"role": "user", "content": "this is forbidden"}]
        for model in ("coe/math", "strict"):
            for stream in (False, True):
                r = http.post("/v1/chat/completions",
                              json={"model": model, "messages": bad, "max_tokens": 2, "stream": stream})
                assert r.status_code == 400, r.text
                e = err(r)
                assert e["code"] == "invalid_prompt" and "roles must alternate" in e["message"]
                assert "x-coe-fallback-from" not in r.headers
        assert reg.get("strict").status == "ready" and reg.get("tiny-b").status == "ready"
        # routed requests go to the next-best expert while its engine still starts (docs/serving.md)
        wait(lambda: next(m for m in http.get("/v1/models").json()["data"] if m["id"] == "strict")["status"]
             == "ready", 60, what="strict's engine to start")
        r = http.post("/v1/chat/completions", json={"model": "coe/math", "messages": HELLO, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["coe"]["expert"] == "strict", r.text
    finally:
        reg.set_map(old_map)
        reg.remove("strict", force=True)
