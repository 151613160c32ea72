"""Issue 31 item 8: error messages a client reads, without a doubled quote (``'tiny-a''s``) or a
repeated clause ("their engines: hf; engine 'hf'; ...")."""

from __future__ import annotations

import pytest

from coe.api.errors import APIError
from coe.serve.ingress import feature_constraint
from expert_registry.spec import Expert

pytestmark = pytest.mark.timeout(300)

HELLO = [{"role": "user", "content": "Hi there, how are you today?"}]


@pytest.mark.parametrize("model, max_tokens, where", [
    ("tiny-a", 10_000, "ingress, named expert"),
    ("coe/general", 600, "ingress, after routing"),
    ("tiny-a", 500, "pool: prompt + max_tokens"),
])
def test_context_errors_name_the_expert_once_and_read_well(http, model, max_tokens, where):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": max_tokens})
    assert r.status_code == 400, (where, r.text)
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens", err
    assert "''" not in err["message"], err["message"]
    assert "the context of expert 'tiny-a' (512 tokens)" in err["message"], err["message"]


def test_an_unsupported_feature_names_each_engine_once():
    small = Expert(name="small", model="/m/s", engine="hf")
    with pytest.raises(APIError) as e:
        feature_constraint({"small": small}, "cpu", "coe", ["logprobs"], None)
    assert e.value.message == ("'logprobs' is not supported by any expert this request may use: their engine (hf) "
                               "does not support it (engines that do: vllm)")
    assert (e.value.status, e.value.param, e.value.code) == (400, "logprobs", "unsupported_parameter")
    # several experts of one engine, and a reason that is not about the engine: each said once
    three = {"small": small, "other": Expert(name="other", model="/m/o", engine="hf"),
             "big": Expert(name="big", model="/m/b", engine="vllm")}
    with pytest.raises(APIError) as e:
        feature_constraint(three, "cpu", "coe", ["tool_choice=auto"], None)
    msg = e.value.message
    assert msg.startswith("'tool_choice' is not supported by any expert this request may use: their engine (hf) "
                          "does not support it (engines that do: vllm); tool_choice 'auto' with tools needs"), msg
    assert msg.count("hf") == 1 and msg.count("tool_call_parser") == 1, msg
