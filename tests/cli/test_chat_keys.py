"""Issue 31 item 2: `coe chat` with keys on. It takes `--api-key`, else `COE_API_KEY`, else
`OPENAI_API_KEY` (its `--help` names both); with no key it sends none, and a 401 then says
"missing API key", not "invalid"; a wrong key says where it came from.

The server here is coe's own auth middleware (coe/security.py, keys from the environment, as
`COE_API_KEYS` gives them) in front of a stand-in chat endpoint, run by uvicorn in this process;
the same check on a real `coe serve` with a key added by `coe keys add` is in test_terminal.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

COE = str(Path(sys.executable).with_name("coe"))
KEY = "coe-test-key-0123456789abcdefghijklmnop"


def _app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from coe.keys import KeyRing
    from coe.security import APIKeyMiddleware

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello from the stand-in."}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
            "coe": {"expert": "stand-in", "forced": "expert"}})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    return APIKeyMiddleware(app, KeyRing(None, env={"COE_API_KEYS": KEY}))


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the stand-in server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def _chat(url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("COE_API_KEY", "OPENAI_API_KEY", "COE_URL")}
    return subprocess.run([COE, "chat", "--url", url, "--no-stream", *args, "Hi"], capture_output=True, text=True,
                          timeout=120, env={**clean, "COLUMNS": "200", **env})


def test_help_names_the_option_and_both_variables():
    res = subprocess.run([COE, "chat", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "100"})
    text = " ".join(res.stdout.replace("│", " ").split())
    assert res.returncode == 0 and "--api-key" in text, res.stdout
    assert "COE_API_KEY" in text and "OPENAI_API_KEY" in text, res.stdout


def test_without_a_key_it_says_missing_not_invalid(url):
    res = _chat(url)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "missing API key: pass --api-key or set COE_API_KEY" in res.stderr, res.stderr
    assert "invalid" not in res.stderr


def test_a_wrong_key_says_invalid_and_where_it_came_from(url):
    res = _chat(url, OPENAI_API_KEY="sk-some-other-service")
    assert res.returncode == 1 and "invalid API key (from $OPENAI_API_KEY)" in res.stderr, res.stderr
    res = _chat(url, "--api-key", "coe-wrong")
    assert res.returncode == 1 and "invalid API key (from --api-key)" in res.stderr, res.stderr


@pytest.mark.parametrize("how", ["--api-key", "COE_API_KEY", "OPENAI_API_KEY", "COE_API_KEY first"])
def test_the_key_comes_from_the_option_or_either_variable(url, how):
    if how == "--api-key":
        res = _chat(url, "--api-key", KEY)
    elif how == "COE_API_KEY first":  # COE_API_KEY wins over an OPENAI_API_KEY meant for OpenAI
        res = _chat(url, COE_API_KEY=KEY, OPENAI_API_KEY="sk-some-other-service")
    else:
        res = _chat(url, **{how: KEY})
    assert res.returncode == 0 and "Hello from the stand-in." in res.stdout, (res.stdout, res.stderr)
