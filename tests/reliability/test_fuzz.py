"""Fuzz the running service from its own OpenAPI schema (schemathesis), bounded: zero 5xx.

For every operation of ``/openapi.json``, schemathesis generates requests that fit the schema (they
reach the router and the tiny experts) and requests that violate it; every response must be a
non-5xx, and every 4xx body must have the OpenAI error shape. About 150 requests in all; the
service must still answer normally afterwards. (Driven through hypothesis directly rather than
schemathesis' pytest plugin, which does not load under this pytest.)"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

pytestmark = pytest.mark.timeout(400)

MAX_EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 25}


def _operations(base: str):
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {"/v1/chat/completions", "/v1/route", "/v1/models", "/healthz"} <= {op.path for op in ops}
    return ops


def _shorten(case) -> None:
    """Keep generated generations short: this checks validation and error handling, not throughput."""
    body = case.body
    if isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int) and not isinstance(body.get(k), bool) and body[k] > 8:
                body[k] = 8


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_server_errors(serve_app, mode):
    seen: dict[tuple[str, int], int] = {}
    failures: list[str] = []
    for op in _operations(serve_app.base):
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # GET routes take no parameters: nothing to violate

        @settings(max_examples=MAX_EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            _shorten(case)
            r = case.call(base_url=serve_app.base, timeout=120)
            seen[(op.path, r.status_code)] = seen.get((op.path, r.status_code), 0) + 1
            if r.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.300} -> {r.status_code} {r.text[:300]}")
            elif r.status_code >= 400:
                err = r.json().get("error")
                assert isinstance(err, dict) and err.get("message") and "type" in err, r.text[:300]

        run()
    assert not failures, "\n".join(failures[:10])
    assert sum(seen.values()) >= 20, seen
    if mode is GenerationMode.NEGATIVE:
        assert all(status < 500 for _, status in seen), seen


def test_still_serving_after_fuzz(http):
    r = http.post("/v1/chat/completions", json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2})
    assert r.status_code == 200, r.text
