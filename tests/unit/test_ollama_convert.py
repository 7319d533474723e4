"""Ollama bodies as the internal ChatRequest (mesh.gateway.ollama): format, tools and the tool
fields of messages, converted without a mesh."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.errors import InvalidInput
from mesh.gateway.ollama import chat_call, generate_call
from mesh.gateway.schemas import ChatRequest
from mesh.gateway.tool_calls import template_messages

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _chat(**body: Any) -> ChatRequest:
    request = chat_call(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}).encode(),
                        None).request
    assert isinstance(request, ChatRequest)
    return request


def test_format_becomes_response_format() -> None:
    assert _chat().response_format is None and _chat(format="").response_format is None
    assert _chat(format="json").response_format.type == "json_object"  # type: ignore[union-attr]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rf = _chat(format=schema).response_format
    assert rf is not None and rf.type == "json_schema" and rf.json_schema is not None
    assert rf.json_schema.json_schema == schema and rf.json_schema.strict
    generated = generate_call(b'{"model": "m", "prompt": "hi", "format": "json"}', None).request
    assert isinstance(generated, ChatRequest) and generated.response_format is not None


@pytest.mark.parametrize("body, words", [
    ({"format": "yaml"}, 'format: must be "json"'),
    ({"format": 3}, "format"),
    ({"format": "json", "tools": [TOOL]}, "format: EdgeMesh cannot combine"),
])
def test_bad_format_is_refused_by_name(body: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        _chat(**body)


def test_format_with_raw_and_tools_on_generate_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"format.*raw"):
        generate_call(b'{"model": "m", "prompt": "hi", "raw": true, "format": "json"}', None)
    with pytest.raises(InvalidInput, match="tools: unknown field"):
        generate_call(json.dumps({"model": "m", "prompt": "hi", "tools": [TOOL]}).encode(), None)


def test_tools_and_fed_back_calls_take_the_template_path() -> None:
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
                {"role": "tool", "content": "rain"}]
    request = _chat(messages=messages, tools=[TOOL])
    assert request.offers_tools() and request.tool_choice is None  # auto
    calls = request.messages[1].tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]
    assert [m.tool_call_id for m in request.messages[2:]] == [calls[0].id, calls[1].id]
    rendered = template_messages(request, template_source="{{ messages }}")
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert json.loads(rendered[2]["content"]) == [{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                   {"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert "Result of the tool call get_weather:\nsunny" in rendered[3]["content"]
    assert rendered[3]["content"].endswith("rain")


@pytest.mark.parametrize("message, words", [
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}, "tool_calls"),
    ({"role": "user", "content": "x", "tool_name": "f"}, "tool_name"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}, "arguments"),
])
def test_misplaced_tool_fields_are_refused_by_name(message: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        chat_call(json.dumps({"model": "m", "messages": [message]}).encode(), None)
