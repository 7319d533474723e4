"""mesh.constraints with the default model's real vocabulary: limits, compile errors, masks that
only let grammatical text through sample(), determinism of a replayed matcher, the tool-call
grammar of tool_choice auto; and the Constraint on the wire."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from mesh.constraints import VOCABULARIES, Matcher, check_schema, json_constraint, json_depth
from mesh.errors import InvalidInput
from mesh.gateway import tool_calls
from mesh.gateway.schemas import ChatRequest, parse
from mesh.sampling import sample
from mesh.transport import convert
from mesh.types import Constraint, GenerationRequest, LayerRange, ModelSha, RequestId, SamplingParams, StageStep

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}


@pytest.fixture(scope="module")
def tokenizer(default_model: Path) -> Any:
    return VOCABULARIES.get(default_model)


def test_depth_and_size_limits_name_the_field_and_the_limit() -> None:
    assert json_depth({"a": [1, {"b": 2}]}) == 3 and json_depth(5) == 0
    with pytest.raises(InvalidInput, match=r"^rf: the schema nests 3 levels.*max_schema_depth"):
        check_schema({"a": [{"b": 1}]}, "rf", 1000, 2)
    with pytest.raises(InvalidInput, match=r"^rf: the schema is \d+ bytes.*max_schema_bytes"):
        check_schema({"a": "x" * 100}, "rf", 50, 8)
    with pytest.raises(InvalidInput, match=r"^rf: the schema cannot be enforced"):
        json_constraint({"type": "nonsense"}, "rf")
    with pytest.raises(InvalidInput, match=r"^format: must be"):
        json_constraint("yaml")
    assert json_constraint("json") == Constraint(kind="json_object")


def _generate(tokenizer: Any, constraint: Constraint, seed: int, steps: int = 40) -> list[int]:
    """Sample under the mask from random logits (a stand-in model that wants anything)."""
    matcher = Matcher(tokenizer, constraint)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for position in range(steps):
        logits = rng.normal(size=tokenizer.vocab_size).astype(np.float32) * 4
        token = sample(matcher.mask(logits), SamplingParams(temperature=0.8, seed=seed), out, position).token_id
        if token == tokenizer.eos_token or (matcher.accepting and not matcher.allowed()[token]):
            break
        matcher.consume([token])
        out.append(token)
        if matcher.accepting and matcher.allowed().sum() <= 3:  # only the end-of-generation tokens left
            break
    return out


def test_masked_sampling_yields_valid_json_and_a_replay_reaches_the_same_state(tokenizer: Any) -> None:
    constraint = json_constraint(SCHEMA, "response_format")
    for seed in range(5):
        tokens = _generate(tokenizer, constraint, seed)
        jsonschema.validate(json.loads(tokenizer.decode_str(tokens)), SCHEMA)
        # A replay consumes the same tokens into a fresh matcher: the masks are the same.
        first, replayed = Matcher(tokenizer, constraint), Matcher(tokenizer, constraint)
        first.consume(tokens[:3])
        replayed.consume(tokens[:3])
        assert np.array_equal(first.allowed(), replayed.allowed())
        assert first.accepting is False
        done = Matcher(tokenizer, constraint)
        done.consume(tokens)
        assert done.accepting and set(np.flatnonzero(done.allowed())) <= {0, 2, 4}  # only SmolLM2's EOG ids


def test_a_token_the_grammar_forbids_is_refused(tokenizer: Any) -> None:
    matcher = Matcher(tokenizer, Constraint(kind="json_object"))
    letter = tokenizer.tokenize_str("hello")[0]
    assert not matcher.allowed()[letter]
    masked = matcher.mask(np.zeros(tokenizer.vocab_size, dtype=np.float32))
    assert masked[letter] == -np.inf and np.isfinite(masked).sum() == matcher.allowed().sum()
    with pytest.raises(InvalidInput, match="does not follow the constraint"):
        matcher.consume([letter])


def _chat(**extra: Any) -> ChatRequest:
    body = {"messages": [{"role": "user", "content": "weather?"}], **extra}
    return parse(ChatRequest, json.dumps(body).encode())  # type: ignore[no-any-return]


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}


def test_tool_choice_auto_is_text_that_cannot_open_a_call_or_a_call(tokenizer: Any) -> None:
    constraint = tool_calls.constraint_of(_chat(tools=[WEATHER]))
    assert constraint is not None and constraint.kind == "lark"
    start = Matcher(tokenizer, constraint).allowed()
    assert start[tokenizer.tokenize_str("{")[0]] and start[tokenizer.tokenize_str("Sure")[0]]
    assert not start[tokenizer.tokenize_str(" {")[0]]  # text may not start with whitespace or a brace
    call = Matcher(tokenizer, constraint)
    call.consume(tokenizer.tokenize_str('{"name":"get_weather","arguments":{"city":"Oslo"}}'))
    assert call.accepting
    wrong = Matcher(tokenizer, constraint)
    with pytest.raises(InvalidInput):
        wrong.consume(tokenizer.tokenize_str('{"name":"get_time"'))
    assert tool_calls.constraint_of(_chat(tools=[WEATHER], tool_choice="none")) is None
    required = tool_calls.constraint_of(_chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=True))
    assert required is not None and json.loads(required.grammar)["type"] == "array"


def test_calls_parse_and_go_back_through_the_template_as_emitted() -> None:
    calls = tool_calls.parse_calls('{"name":"get_weather","arguments":{"city":"Oslo"}}')
    assert calls is not None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert tool_calls.parse_calls('{"name":"get_weather","argu') is None
    body = _chat(tools=[WEATHER], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    rendered = tool_calls.template_messages(body, "{{ messages }}")  # a template with no tool role
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": '{"name":"get_weather","arguments":{"city":"Oslo"}}'}
    assert rendered[3] == {"role": "user", "content": "Result of the tool call get_weather:\nsunny"}
    assert tool_calls.template_messages(body, "{% if m.role == 'tool' %}")[3]["role"] == "tool"


def test_the_constraint_crosses_the_wire_and_a_bad_kind_is_refused() -> None:
    constraint = Constraint(kind="json_schema", grammar=json.dumps(SCHEMA))
    request = GenerationRequest(request_id=RequestId("r"), prompt_tokens=(1, 2), sampling=SamplingParams(),
                                max_tokens=4, stop_token_ids=frozenset({2}), constraint=constraint)
    assert convert.generate_request_from_pb(convert.generate_request_to_pb(request)).constraint == constraint
    free = GenerationRequest(request_id=RequestId("r"), prompt_tokens=(1,), sampling=SamplingParams(),
                             max_tokens=4, stop_token_ids=frozenset())
    assert convert.generate_request_from_pb(convert.generate_request_to_pb(free)).constraint is None
    step = StageStep(session_id="s", model_sha256=ModelSha("m"), layers=LayerRange(0, 2), start_position=3,
                     tokens=(5,), hidden=None, sampling=SamplingParams(), constraint=constraint, generated=(5,))
    back = convert.stage_step_from_pb(convert.stage_step_to_pb(step))
    assert back.constraint == constraint and back.generated == (5,)
    msg = convert.generate_request_to_pb(request)
    msg.constraint.kind = "regex"
    with pytest.raises(InvalidInput, match=r"constraint\.kind"):
        convert.generate_request_from_pb(msg)
