"""Tool calling (OpenAI's tools and tool_choice): tools rendered through the chat template (the
default model's has none: 400; a gateway started with the Hermes-format template renders them),
`<tool_call>` blocks parsed into tool_calls (streamed too), required and named choices constrained
by a grammar so every call validates against its function's parameters; bad input is 400 /
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import jsonschema
import pytest

from services.client import GatewayClient, GatewayError
from services.common.errors import InvalidRequest
from services.common.model_files import default_cache_dir, resolve_model_dir
from services.gateway.text import PromptEncoder
from services.gateway.tools import ToolCallStream, Tools, tools_from_openai, tools_from_pb
from tests.conftest import TOOLS_TEMPLATE, RunningStack

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
                       "required": ["timezone"], "additionalProperties": False}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# parsing ---------------------------------------------------------------------------------------
def _streamed(tools: Tools, deltas: list[str]) -> tuple[str, str, tuple[Any, ...]]:
    stream = ToolCallStream(tools)
    live = "".join(stream.add(delta) for delta in deltas)
    rest, calls = stream.finish()
    return live, rest, calls


def test_auto_streams_content_holds_back_a_call_and_parses_it() -> None:
    tools = Tools((WEATHER, TIME))
    deltas = ["Let me check. <tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Paris\"}}",
              "\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>"]
    live, rest, calls = _streamed(tools, deltas)
    assert live == "Let me check. " and rest == ""  # "<tool" was held back: it could start a call
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Paris"}),
                                                                           ("get_time", {})]
    assert len({call.id for call in calls}) == 2


@pytest.mark.parametrize("text", ["<tool_call>{not json}</tool_call>", '<tool_call>{"name": "other"}</tool_call>',
                                  "I would use <tool_call> here"])
def test_auto_text_that_only_looks_like_a_call_stays_content(text: str) -> None:
    live, rest, calls = _streamed(Tools((WEATHER,)), [text[:5], text[5:]])
    assert live + rest == text and calls == ()


def test_plain_text_and_no_tools_pass_through() -> None:
    assert _streamed(Tools((WEATHER,)), ["Paris is ", "sunny <"]) == ("Paris is sunny ", "<", ())
    assert _streamed(Tools((WEATHER,), "none"), ["<tool_call>{}", "</tool_call>"])[2] == ()


def test_required_and_named_outputs_are_calls_and_a_cut_output_stays_text() -> None:
    required = Tools((WEATHER, TIME), "required")
    live, rest, calls = _streamed(required, ['[{"name": "get_time", ', '"arguments": {"timezone": "UTC"}}]'])
    assert live == rest == "" and [(c.name, c.arguments) for c in calls] == [("get_time", '{"timezone": "UTC"}')]
    named = Tools((WEATHER, TIME), "get_weather")
    assert _streamed(named, ['{"city": "Oslo", "unit": "celsius"}'])[2][0].name == "get_weather"
    assert _streamed(named, ['{"city": "Os'])[1:] == ('{"city": "Os', ())  # max_tokens cut it: text


def test_the_constraints_validate_every_call() -> None:
    schema = json.loads(Tools((WEATHER, TIME), "required").constraint().spec)  # type: ignore[union-attr]
    jsonschema.validate([{"name": "get_time", "arguments": {"timezone": "UTC"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_time", "arguments": {"city": "Paris", "unit": "celsius"}}], schema)
    assert json.loads(Tools((WEATHER,), "get_weather").constraint().spec) == WEATHER["parameters"]  # type: ignore
    assert Tools((WEATHER,)).constraint() is None


@pytest.mark.parametrize(("tools", "choice", "message"), [
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools\\[0\\].function.name"),
    ([{"type": "function", "function": WEATHER}] * 2, None, "unique"),
    ([{"type": "retrieval"}], None, "tools\\[0\\] must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "parameters"),
    (TOOLS, {"type": "function", "function": {"name": "get_mood"}}, "tool_choice names function"),
    (TOOLS, "get_mood", "^tool_choice must be"),
    (TOOLS, {"type": "function"}, "^tool_choice must be"),
    (None, "required", "tool_choice needs tools"),
])
def test_bad_tools_are_refused_naming_the_field(tools: Any, choice: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        tools_from_openai(tools, choice)


# through the services --------------------------------------------------------------------------
def _chat(stack: RunningStack, body: dict[str, Any], http: str = "http_tools") -> httpx.Response:
    return httpx.post(stack[http] + "/v1/chat/completions",
                      json={"model": MODEL, "messages": ASK, "max_tokens": 60, "temperature": 0, **body}, timeout=180)


def test_a_named_tool_choice_returns_a_valid_call(memory_stack: RunningStack) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = _chat(memory_stack, {"tools": TOOLS, "tool_choice": choice}).json()
    message, finish = body["choices"][0]["message"], body["choices"][0]["finish_reason"]
    assert finish == "stop" and message["content"] is None and len(message["tool_calls"]) == 1  # as OpenAI
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["parameters"])
    streamed = _chat(memory_stack, {"tools": TOOLS, "tool_choice": choice, "stream": True})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    deltas = [c["delta"] for chunk in chunks for c in chunk["choices"] if "tool_calls" in c["delta"]]
    assert len(deltas) == 1 and deltas[0]["tool_calls"][0]["function"] == call["function"]
    assert deltas[0]["tool_calls"][0]["index"] == 0
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == ["stop"]


def test_required_calls_validate_against_their_functions(memory_stack: RunningStack) -> None:
    body = _chat(memory_stack, {"tools": TOOLS, "tool_choice": "required", "max_tokens": 80}).json()
    calls = body["choices"][0]["message"]["tool_calls"]
    assert body["choices"][0]["finish_reason"] == "tool_calls" and calls
    schemas = {"get_weather": WEATHER["parameters"], "get_time": TIME["parameters"]}
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_auto_returns_content_or_calls_of_offered_tools(memory_stack: RunningStack) -> None:
    body = _chat(memory_stack, {"tools": TOOLS, "n": 2, "temperature": 0.8, "seed": 4}).json()
    for choice in body["choices"]:
        message = choice["message"]
        if choice["finish_reason"] == "tool_calls":
            assert {call["function"]["name"] for call in message["tool_calls"]} <= {"get_weather", "get_time"}
        else:
            assert "tool_calls" not in message and isinstance(message["content"], str)


def test_a_conversation_with_a_tool_result_is_rendered(memory_stack: RunningStack) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    tokenized = httpx.post(memory_stack["http_tools"] + "/tokenize", json={"model": MODEL, "messages": messages,
                                                                           "tools": TOOLS})
    text = httpx.post(memory_stack["http_tools"] + "/detokenize",
                      json={"model": MODEL, "tokens": tokenized.json()["tokens"]}).json()["prompt"]
    assert '"name": "get_weather"' in text and "<tool_response>\n18 degrees and sunny\n</tool_response>" in text
    assert '<tools>\n{"type": "function"' in text and '}\n{"type": "function"' in text  # one tool a line
    assert _chat(memory_stack, {"tools": TOOLS, "messages": messages}).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": TOOLS, "tool_choice": "get_mood"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "content": "18 degrees"}]}, "messages"),
])
def test_bad_tool_requests_get_400_naming_the_field(memory_stack: RunningStack, body: dict[str, Any],
                                                    param: str) -> None:
    response = _chat(memory_stack, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_template_without_tools_gets_400(memory_stack: RunningStack) -> None:
    response = _chat(memory_stack, {"tools": TOOLS}, http="http")
    assert response.status_code == 400 and "no tool support" in response.json()["error"]["message"]
    tool_turn = [*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}]
    assert _chat(memory_stack, {"messages": tool_turn}, http="http").status_code == 400


async def test_grpc_tools_and_their_bad_input(memory_stack: RunningStack) -> None:
    async with GatewayClient(memory_stack["gateway_tools"]) as client:
        result = await client.complete(messages=[("user", "Time in Tokyo?")], max_tokens=40, temperature=0,
                                       tools=[WEATHER, TIME], tool_choice="get_time")
        assert result.finish_reason == "stop" and [call.name for call in result.tool_calls] == ["get_time"]
        jsonschema.validate(json.loads(result.tool_calls[0].arguments), TIME["parameters"])
        bad = {**TIME, "parameters": "not json"}
        with pytest.raises(GatewayError) as caught:
            await client.complete(messages=[("user", "Hi")], max_tokens=4, tools=[bad])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tools" in caught.value.details()


# review findings: one test per defect -------------------------------------------------------------
def test_required_keeps_each_functions_definitions_reachable() -> None:
    """Parameters with $defs (pydantic's nested models) are nested in the required choice's schema:
    their definitions move to the root with their references, so the grammar compiles."""
    located = {"name": "locate", "parameters": {"type": "object", "properties": {"where": {"$ref": "#/$defs/Loc"}},
                                                "required": ["where"], "$defs": {"Loc": {
                                                    "type": "object", "properties": {"city": {"type": "string"}}}}}}
    constraint = Tools((located, TIME), "required").constraint()
    assert constraint is not None
    constraint.check()
    schema = json.loads(constraint.spec)
    assert "f0_Loc" in schema["$defs"]
    jsonschema.validate([{"name": "locate", "arguments": {"where": {"city": "Oslo"}}}], schema)


def test_a_final_call_without_its_closing_tag_is_still_a_call() -> None:
    _, rest, calls = _streamed(Tools((WEATHER,)), ['<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'])
    assert rest == "" and [call.name for call in calls] == ["get_weather"]


def test_a_choice_cut_short_keeps_length_and_a_named_choice_stops() -> None:
    call = ToolCallStream(Tools((WEATHER,))).tools
    calls = Tools((WEATHER,)).calls('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>')
    assert call.finish_reason("stop", calls) == "tool_calls" and call.finish_reason("length", calls) == "length"
    assert Tools((WEATHER,), "get_weather").finish_reason("stop", calls) == "stop"  # as OpenAI's API answers


def test_named_arguments_are_always_json() -> None:
    spelled = {"name": "spell", "parameters": {"type": "string"}}
    (call,) = Tools((spelled,), "spell").calls('"hello"')
    assert json.loads(call.arguments) == "hello"


def test_parallel_tool_calls_false_allows_one_call() -> None:
    single = Tools((WEATHER, TIME), "required", parallel=False)
    assert json.loads(single.constraint().spec)["maxItems"] == 1  # type: ignore[union-attr]
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", ' \
           '"arguments": {}}</tool_call>'
    assert len(Tools((TIME,), parallel=False).calls(text)) == 1 and len(Tools((TIME,)).calls(text)) == 2


def test_json_nested_past_the_parser_is_invalid_not_internal() -> None:
    with pytest.raises(InvalidRequest, match="parameters_json"):
        tools_from_pb([("f", "", "[" * 100000)], "auto")
    assert _streamed(Tools((WEATHER,)), ["<tool_call>" + "[" * 100000])[2] == ()


def test_a_marker_the_tokenizer_treats_as_special_means_no_tool_support() -> None:
    """Special tokens are dropped from decoded text, so such a model's calls could never be parsed."""
    encoder = PromptEncoder(resolve_model_dir("default", default_cache_dir()), TOOLS_TEMPLATE.read_text())
    assert encoder.supports_tools
    encoder.tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    assert not encoder.supports_tools
