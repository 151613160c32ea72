"""The chat request's field handling, without Ray: every field honoured or refused, the one
conversion to the engine's sampling parameters, tool calls, personas, the feature constraint."""

from __future__ import annotations

import json

import pytest

from coe.api.assemble import ChoicesBuilder
from coe.api.errors import APIError
from coe.api.protocol import NEUTRAL, REFUSED, ChatCompletionRequest, RequestFieldError, parse_tool_calls
from coe.engines.base import SamplingParams, compose_system, render_chat
from coe.engines.features import ENGINE_FEATURES, VLLM_FEATURES
from coe.serve.ingress import feature_constraint, to_generate_request
from expert_registry.spec import Expert

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "coe", "messages": USER, **kw})


def test_sdk_defaults_are_neutral_everywhere():
    # what openai / vLLM clients send when the user leaves a field alone
    r = req(n=1, logprobs=False, top_logprobs=0, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
            response_format={"type": "text"}, tool_choice="none", tools=[], parallel_tool_calls=True, user="u1",
            stream=False, store=False, metadata={"a": "b"}, top_k=-1, min_p=0, repetition_penalty=1.0,
            skip_special_tokens=True, add_generation_prompt=True, echo=False, service_tier="auto")
    r.check_supported()
    assert r.features() == []
    assert to_generate_request(r, "rid").sampling.model_fields_set == set()


def test_every_declared_field_has_a_class():
    """Each field of the request is core (every engine), an engine feature, or refused."""
    core = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
            "stream", "stream_options", "user", "metadata", "safety_identifier", "prompt_cache_key", "request_id"}
    for f in ChatCompletionRequest.model_fields:
        assert f in core or f in NEUTRAL, f
        if f in NEUTRAL:
            assert f in REFUSED or f in VLLM_FEATURES or f in ENGINE_FEATURES["hf"], f


@pytest.mark.parametrize("field,value", [
    ("use_beam_search", True), ("best_of", 2), ("echo", True), ("chat_template", "{{ x }}"),
    ("logits_processors", ["x"]), ("functions", [{"name": "f"}]), ("audio", {"voice": "x"}),
    ("modalities", ["text", "audio"]), ("store", True), ("continue_final_message", True),
])
def test_fields_no_engine_honours_are_refused_by_name(field, value):
    with pytest.raises(APIError) as e:
        to_generate_request(req(**{field: value}), None)
    assert (e.value.status, e.value.param, e.value.code) == (400, field, "unsupported_parameter")


def test_unknown_fields_are_refused_not_dropped():
    with pytest.raises(APIError) as e:
        to_generate_request(req(frobnicate=True), None)
    assert (e.value.param, e.value.code) == ("frobnicate", "unsupported_parameter")


def test_bad_combinations_and_ranges():
    for kw, param in ((dict(top_logprobs=3), "top_logprobs"), (dict(tool_choice="required"), "tool_choice"),
                      (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice")):
        with pytest.raises(APIError) as e:
            to_generate_request(req(**kw), None)
        assert e.value.status == 400 and e.value.param == param
    with pytest.raises(Exception):
        req(seed=2**64)  # vLLM's range: a signed 64-bit integer


def test_one_conversion_to_sampling_params():
    r = req(max_tokens=50, max_completion_tokens=20, temperature=0.3, top_p=0.9, seed=-5, stop="END", n=3,
            presence_penalty=0.5, frequency_penalty=-0.2, logit_bias={"42": 5}, logprobs=True, top_logprobs=2,
            top_k=40, min_p=0.1, repetition_penalty=1.1, min_tokens=3, stop_token_ids=[7], ignore_eos=True,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            reasoning_effort="low", chat_template_kwargs={"enable_thinking": False})
    g = to_generate_request(r, "rid-1")
    s = g.sampling
    assert g.request_id == "rid-1" and g.max_tokens_explicit
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop, s.n) == (20, 0.3, 0.9, -5, ["END"], 3)
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias, s.logprobs) == (0.5, -0.2, {42: 5.0}, 2)
    assert (s.top_k, s.min_p, s.repetition_penalty, s.min_tokens, s.stop_token_ids, s.ignore_eos) == \
        (40, 0.1, 1.1, 3, [7], True)
    assert s.structured.json_schema == {"type": "object"}
    assert s.chat_template_kwargs == {"enable_thinking": False, "reasoning_effort": "low"}
    assert set(r.features()) >= {"n", "logprobs", "top_logprobs", "response_format", "logit_bias"}
    # the typed object survives the trip to the pool replica (Ray pickles pydantic models)
    import pickle

    back = pickle.loads(pickle.dumps(g))
    assert back == g and back.sampling.model_fields_set == s.model_fields_set


def test_json_mode_and_guided_fields_become_structured_outputs():
    assert req(response_format={"type": "json_object"}).to_sampling_params().structured.json_object
    assert req(guided_regex="a+").to_sampling_params().structured.regex == "a+"
    assert req(guided_choice=["yes", "no"]).to_sampling_params().structured.choice == ["yes", "no"]
    assert req(structured_outputs={"json": '{"type": "integer"}'}).to_sampling_params().structured.json_schema == \
        {"type": "integer"}


def test_tools_and_forced_tool_choice():
    named = req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    s = named.to_sampling_params()
    assert s.tools[0]["function"]["name"] == "get_weather"
    assert s.structured.json_schema["required"] == ["city"]  # the function's parameters
    assert named.forced_tool_choice() == "get_weather"
    required = req(tools=TOOLS, tool_choice="required").to_sampling_params().structured.json_schema
    assert required["type"] == "array" and required["items"]["anyOf"][0]["properties"]["name"]["enum"] == ["get_weather"]
    assert req(tools=TOOLS).forced_tool_choice() is None  # auto: the model may answer in text
    assert req(tools=TOOLS, tool_choice="none").to_sampling_params().tools is None


def test_tool_calls_are_parsed_from_constrained_output():
    calls = parse_tool_calls('{"city": "Paris"}', "get_weather")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    calls = parse_tool_calls('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": 1}}]', "required")
    assert [c.function.name for c in calls] == ["a", "b"]
    assert parse_tool_calls("not json", "required") is None
    b = ChoicesBuilder(1, False, "get_weather")
    b.add({"index": 0, "text": '{"city": ', "completion_tokens": 3})
    b.add({"index": 0, "text": '"Oslo"}', "completion_tokens": 5, "finish_reason": "stop"})
    (choice,) = b.choices()
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Oslo"}


def test_n_choices_and_logprobs_are_assembled_per_index():
    b = ChoicesBuilder(2, True, None)
    b.add({"index": 0, "text": "a", "completion_tokens": 1, "prompt_tokens": 9,
           "logprobs": [{"token": "a", "logprob": -0.1, "top": [["a", -0.1], ["b", -2.0]]}]})
    b.add({"index": 1, "text": "c", "completion_tokens": 1, "finish_reason": "length",
           "logprobs": [{"token": "c", "logprob": -0.5, "top": []}]})
    b.add({"index": 0, "text": "", "completion_tokens": 1, "finish_reason": "stop"})
    c0, c1 = b.choices()
    assert (c0.message.content, c0.finish_reason, c1.message.content, c1.finish_reason) == ("a", "stop", "c", "length")
    assert c0.logprobs.content[0].top_logprobs[1].token == "b" and c0.logprobs.content[0].bytes == [97]
    assert b.completion_tokens == 2 and b.prompt_tokens == 9


def test_multi_turn_keeps_tool_calls_results_names_and_parts():
    r = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "weather "}, {"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    ]})
    msgs = [m.template_dict() for m in to_generate_request(r, None).messages]
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1] == {"role": "user", "content": "weather Oslo?", "name": "ann"}
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}
    assert msgs[3] == {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}


def test_persona_and_client_system_message_are_merged_in_order():
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}]
    out = compose_system("You are Marie, a chef.", msgs)
    assert out == [{"role": "system", "content": "You are Marie, a chef.\n\nAnswer in French."},
                   {"role": "user", "content": "hi"}]
    assert compose_system("P", [{"role": "user", "content": "x"}])[0] == {"role": "system", "content": "P"}
    assert compose_system(None, msgs) == msgs


def test_persona_reaches_the_real_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    e = Expert(name="chef", model=str(tiny_model_dir), system_prompt="You are Marie, a chef.")
    text = render_chat(e, tok, [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}])
    assert "You are Marie, a chef.\n\nAnswer in French." in text and text.count("<|im_start|>system") == 1


def test_features_are_a_routing_constraint():
    experts = {"small": Expert(name="small", model="/m/s", engine="hf"),
               "big": Expert(name="big", model="/m/b", engine="vllm"),
               "auto": Expert(name="auto", model="/m/a")}
    assert feature_constraint(experts, "cpu", "coe", [], None) is None
    assert feature_constraint(experts, "cpu", "coe", ["tools"], None) == {"big"}  # auto on CPU = hf
    with pytest.raises(APIError) as e:
        feature_constraint(experts, "cpu", "small", ["tools"], None)
    assert (e.value.status, e.value.param, e.value.code) == (400, "tools", "unsupported_parameter")
    assert "'hf'" in e.value.message and "vllm" in e.value.message
    with pytest.raises(APIError) as e:
        feature_constraint({"small": experts["small"]}, "cpu", "coe", ["logprobs"], None)
    assert (e.value.status, e.value.param) == (400, "logprobs")
    # a key's permissions narrow it too
    assert feature_constraint(experts, "cpu", "coe", [], {"small"}) == {"small"}
    with pytest.raises(APIError) as e:
        feature_constraint(experts, "cpu", "big", [], {"small"})
    assert (e.value.status, e.value.code) == (403, "model_not_permitted")


def test_sampling_params_keep_expert_defaults_for_unset_fields():
    class Gen:
        max_tokens, temperature, top_p, stop = 64, 0.2, 0.8, ["x"]

    s = req(temperature=1.0).to_sampling_params().with_defaults(Gen())
    assert (s.max_tokens, s.temperature, s.top_p, s.stop) == (64, 1.0, 0.8, ["x"])
    assert isinstance(s, SamplingParams)
