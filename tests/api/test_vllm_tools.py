"""tool_choice "auto" on vLLM, CPU side: which experts may take it, how the engine's parsed calls
become OpenAI ``tool_calls``, and the refusal for an expert without a tool-call parser. The GPU
run (vLLM's real parsers) is ``tests/engines/test_vllm_gpu.py::test_auto_tool_choice_goes_through_the_parser``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from coe.api.assemble import ChoicesBuilder
from coe.api.errors import APIError
from coe.api.protocol import ChatCompletionRequest
from coe.engines.base import GenerationChunk, ToolCall
from coe.engines.vllm_tools import ToolCallCollector, to_tool_calls
from coe.serve.ingress import feature_constraint
from expert_registry.spec import EngineSettings, Expert

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "coe", "messages": USER, **kw})


def vllm_info(called: bool, calls=(), content=None):
    """The shape of vLLM's ``ExtractedToolCallInformation`` (OpenAI-shaped ``ToolCall`` items)."""
    return SimpleNamespace(tools_called=called, content=content, tool_calls=[
        SimpleNamespace(id=i, type="function", function=SimpleNamespace(name=n, arguments=a)) for i, n, a in calls])


def test_auto_tools_are_a_feature_that_needs_a_parser():
    assert req(tools=TOOLS).features() == ["tools", "tool_choice=auto"]  # tool_choice unset = auto
    assert req(tools=TOOLS, tool_choice="auto").features() == ["tools", "tool_choice=auto"]
    assert req(tools=TOOLS, tool_choice="none").features() == ["tools"]
    assert req(tools=TOOLS, tool_choice="required").features() == ["tools", "tool_choice"]
    assert req(tools=TOOLS).to_sampling_params().tools_auto
    assert not req(tools=TOOLS, tool_choice="required").to_sampling_params().tools_auto
    assert not req(tools=TOOLS, tool_choice="none").to_sampling_params().tools_auto


def test_an_expert_without_a_parser_is_refused_for_auto_and_kept_for_required():
    experts = {"plain": Expert(name="plain", model="/m/p", engine="vllm"),
               "hermes": Expert(name="hermes", model="/m/h", engine="vllm",
                                engine_settings=EngineSettings(tool_call_parser="hermes"))}
    auto = req(tools=TOOLS).features()
    assert feature_constraint(experts, "cuda", "coe", auto, None) == {"hermes"}
    with pytest.raises(APIError) as e:
        feature_constraint(experts, "cuda", "plain", auto, None)
    assert (e.value.status, e.value.param, e.value.code) == (400, "tool_choice", "unsupported_parameter")
    assert "tool_call_parser" in e.value.message and "'required'" in e.value.message
    with pytest.raises(APIError) as e:  # nothing left to route to
        feature_constraint({"plain": experts["plain"]}, "cuda", "coe", auto, None)
    assert (e.value.status, e.value.param) == (400, "tool_choice") and "tool_call_parser" in e.value.message
    # a forced choice is constrained decoding, no parser needed
    forced = req(tools=TOOLS, tool_choice="required").features()
    assert feature_constraint(experts, "cuda", "plain", forced, None) == {"plain", "hermes"}
    # a parser in the pool's engine defaults counts for every expert
    assert feature_constraint(experts, "cuda", "plain", auto, None,
                              EngineSettings(tool_call_parser="llama3_json")) == {"plain", "hermes"}
    # the hf engine cannot take tools at all: the first field it lacks is named
    with pytest.raises(APIError) as e:
        feature_constraint({"cpu": Expert(name="cpu", model="/m/c", engine="hf")}, "cpu", "cpu", auto, None)
    assert e.value.param == "tools" and "'hf'" in e.value.message


def test_a_bad_parser_name_is_refused_when_registered():
    with pytest.raises(ValueError):
        EngineSettings(tool_call_parser="rm -rf /")


def test_vllm_parser_output_becomes_openai_tool_calls():
    content, calls = to_tool_calls(vllm_info(True, [("call_1", "get_weather", '{"city": "Paris"}')], content=" "))
    assert content is None and calls == [ToolCall(id="call_1", function={"name": "get_weather",
                                                                          "arguments": '{"city": "Paris"}'})]
    assert to_tool_calls(vllm_info(False, content="Sunny.")) is None
    _, calls = to_tool_calls(vllm_info(True, [("", "get_weather", "")]))
    assert calls[0].id.startswith("call_") and calls[0].function.arguments == "{}"


def _run(collector, pieces, finish="stop"):
    out = []
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1
        c = collector.feed(GenerationChunk(text=text, finish_reason=finish if last else None, prompt_tokens=5,
                                           completion_tokens=i + 1))
        if c is not None:
            out.append(c)
    return out


def test_the_answer_is_held_back_and_sent_whole_with_its_calls():
    seen = []

    def parse(text):
        seen.append(text)
        doc = json.loads(text) if text.startswith("{") else None
        return (None, [ToolCall(id="call_x", function={"name": doc["name"], "arguments": json.dumps(doc["arguments"])})]
                ) if doc else None

    out = _run(ToolCallCollector(parse), ['{"name": "get_', 'weather", "arguments": ', '{"city": "Paris"}}'])
    assert len(out) == 1 and seen == ['{"name": "get_weather", "arguments": {"city": "Paris"}}']
    assert out[0].finish_reason == "tool_calls" and out[0].text == "" and out[0].completion_tokens == 3
    assert out[0].tool_calls[0].function.name == "get_weather"
    # a plain answer goes out as text, whole; a cut one (length) is not parsed
    out = _run(ToolCallCollector(parse), ["It is ", "sunny."])
    assert [(c.text, c.finish_reason, c.tool_calls) for c in out] == [("It is sunny.", "stop", None)]
    out = _run(ToolCallCollector(parse), ['{"name": "get_weather"'], finish="length")
    assert out[0].finish_reason == "length" and out[0].tool_calls is None


def test_the_ingress_answers_openai_tool_calls():
    item = {"type": "chunk", "index": 0, "text": "", "finish_reason": "tool_calls", "prompt_tokens": 5,
            "completion_tokens": 9, "tool_calls": [{"id": "call_x", "type": "function",
                                                    "function": {"name": "get_weather", "arguments": "{}"}}]}
    b = ChoicesBuilder(1, False, None)
    b.add(item)
    choice = b.choices()[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None,
                    reason="vLLM not installed (GPU machine only)")
def test_vllm_parsers_through_coe(tiny_model_dir):  # pragma: no cover - runs where vLLM is installed
    """vLLM's real parsers behind coe's translation: pythonic (plain text) and Hermes (special
    tokens, which it asks to keep)."""
    from transformers import AutoTokenizer

    from coe.engines.vllm_tools import tool_parser

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    parse, keep = tool_parser("pythonic", tok, USER, TOOLS)
    content, calls = parse("[get_weather(city='Paris')]")
    assert not keep and content is None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and parse("Sunny.") is None
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    parse, keep = tool_parser("hermes", tok, USER, TOOLS)
    content, calls = parse('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                           '</tool_call>')
    assert keep and content.strip() == "Let me check." and calls[0].function.name == "get_weather"
    with pytest.raises(KeyError):
        tool_parser("no-such-parser", tok, USER, TOOLS)
