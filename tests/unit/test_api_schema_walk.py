"""No request field is silently ignored (issue 19, part 1): a walk over the official OpenAI
client's own request schemas (openai.types...CompletionCreateParamsBase), field by field.

Every field must be implemented (a field of our request model that is used), informational
(it asks for nothing in the answer) or refused with a 400 that names it whenever its value
asks for something. A field OpenAI adds later fails this test until someone decides which."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from mesh.errors import InvalidInput
from mesh.gateway.schemas import (
    INFORMATIONAL,
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETION,
    ChatRequest,
    CompletionRequest,
    parse,
)

MESSAGES = [{"role": "user", "content": "hi"}]
BASE: dict[type[Any], dict[str, Any]] = {ChatRequest: {"messages": MESSAGES}, CompletionRequest: {"prompt": "hi"}}
SCHEMAS = {ChatRequest: (chat_params.CompletionCreateParamsBase, UNSUPPORTED_CHAT),
           CompletionRequest: (completion_params.CompletionCreateParamsBase, UNSUPPORTED_COMPLETION)}

# A value of each implemented field that asks for something, to show it is read (not refused).
IMPLEMENTED_SAMPLES: dict[str, Any] = {
    "messages": MESSAGES, "prompt": "hi", "model": "anything", "max_tokens": 5, "max_completion_tokens": 5,
    "temperature": 0.3, "top_p": 0.5, "seed": 7, "stop": ["\n"], "stream": True,
    "stream_options": {"include_usage": True}, "n": 1,
    "frequency_penalty": 1.5, "presence_penalty": -0.5, "logit_bias": {"50256": -100}, "top_logprobs": 2,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "parallel_tool_calls": True, "response_format": {"type": "json_object"},
}
# Implemented fields whose sample differs by endpoint, or needs another field beside it.
LOGPROBS_SAMPLE: dict[type[Any], Any] = {ChatRequest: True, CompletionRequest: 2}
COMPANIONS: dict[str, dict[str, Any]] = {"top_logprobs": {"logprobs": True}}
# A value of each field not supported yet that asks for something: refused, naming the field.
ASKING: dict[str, Any] = {
    "functions": [{"name": "f"}], "function_call": {"name": "f"},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {}, "moderation": {"model": "x"},
    "best_of": 3, "echo": True, "suffix": "end",
}
# The value of each such field that asks for nothing: accepted.
NOTHING: dict[str, Any] = {
    "functions": [], "function_call": "auto", "audio": None, "modalities": ["text"], "prediction": None,
    "reasoning_effort": None, "verbosity": None, "web_search_options": None, "moderation": None, "best_of": 1,
    "echo": False, "suffix": "",
}
INFORMATIONAL_SAMPLES: dict[str, Any] = {
    "user": "alice", "metadata": {"team": "ops"}, "store": True, "service_tier": "auto",
    "safety_identifier": "u-1", "prompt_cache_key": "k", "prompt_cache_retention": "24h",
    "prompt_cache_options": {"x": 1},
}


def _parse(model: type[Any], extra: dict[str, Any]) -> Any:
    return parse(model, json.dumps({**BASE[model], **extra}).encode())


def _openai_fields(model: type[Any]) -> list[str]:
    schema, _ = SCHEMAS[model]
    return sorted({*schema.__annotations__, "stream"})  # `stream` lives in the two subclasses


@pytest.mark.parametrize("model", [ChatRequest, CompletionRequest], ids=["chat", "completions"])
def test_every_openai_request_field_is_implemented_informational_or_refused(model: type[Any]) -> None:
    _, unsupported = SCHEMAS[model]
    ours = set(model.model_fields)
    for field in _openai_fields(model):
        assert field in ours, f"{field}: an OpenAI field our {model.__name__} does not know: decide what it is"
        if field in unsupported:
            with pytest.raises(InvalidInput) as refused:
                _parse(model, {field: ASKING[field]})
            assert str(refused.value).startswith(f"{field}: "), refused.value
            assert "not support" in str(refused.value)
            _parse(model, {field: NOTHING[field]})
        elif field in INFORMATIONAL:
            _parse(model, {field: INFORMATIONAL_SAMPLES[field]})
        else:
            sample = LOGPROBS_SAMPLE[model] if field == "logprobs" else IMPLEMENTED_SAMPLES[field]
            parsed = _parse(model, {**COMPANIONS.get(field, {}), field: sample})
            assert field in parsed.model_fields_set


@pytest.mark.parametrize("model", [ChatRequest, CompletionRequest], ids=["chat", "completions"])
def test_a_field_of_no_schema_is_refused_by_name(model: type[Any]) -> None:
    with pytest.raises(InvalidInput, match=r"^frequency_penalti: unknown field"):
        _parse(model, {"frequency_penalti": 1})  # a typo of a real field must not pass for it


def test_message_fields_that_cannot_be_rendered_are_refused() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for message, field in (({"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}, "tool_calls"),
                           ({"role": "user", "content": "", "tool_calls": [call]}, "tool_calls"),
                           ({"role": "assistant", "content": "", "function_call": {"name": "f"}}, "function_call"),
                           ({"role": "user", "content": "hi", "cache": True}, "cache")):
        with pytest.raises(InvalidInput, match=field):
            parse(ChatRequest, json.dumps({"messages": [message, *MESSAGES]}).encode())
    # What another server's earlier turns carry and the template can do without: accepted.
    parse(ChatRequest, json.dumps({"messages": [{"role": "assistant", "content": None, "tool_calls": [call]},
                                                {"role": "assistant", "content": "no", "refusal": None},
                                                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                                                *MESSAGES]}).encode())


def test_logprob_and_penalty_fields_are_checked() -> None:
    with pytest.raises(InvalidInput, match=r"^top_logprobs: set logprobs to true"):
        _parse(ChatRequest, {"top_logprobs": 2})
    with pytest.raises(InvalidInput, match="top_logprobs"):
        _parse(ChatRequest, {"logprobs": True, "top_logprobs": 21})
    with pytest.raises(InvalidInput, match="logprobs"):
        _parse(CompletionRequest, {"logprobs": 21})
    with pytest.raises(InvalidInput, match=r"logit_bias: .*'abc' is not a token id"):
        _parse(ChatRequest, {"logit_bias": {"abc": 1}})
    with pytest.raises(InvalidInput, match=r"logit_bias: .*outside -100\.\.100"):
        _parse(ChatRequest, {"logit_bias": {"5": 101}})
    with pytest.raises(InvalidInput, match="frequency_penalty"):
        _parse(ChatRequest, {"frequency_penalty": 2.5})
    parsed = _parse(ChatRequest, {"logit_bias": {"9": 1, "3": -100.0}, "presence_penalty": 1, "frequency_penalty": 0.5})
    sampling = parsed.sampling()
    assert sampling.logit_bias == ((3, -100.0), (9, 1.0))
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (1.0, 0.5) and sampling.penalised
    assert _parse(CompletionRequest, {"logprobs": 0}).logprob_request() == (True, 0)
    assert _parse(CompletionRequest, {}).logprob_request() == (False, 0)
    assert _parse(ChatRequest, {"logprobs": True, "top_logprobs": 3}).logprob_request() == (True, 3)
