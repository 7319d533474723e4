"""Structured output and tool calls (issue 19, parts 4 and 5) on replicas, with the official
`openai` client against `edgemesh up` (two replicas, so one can be killed mid-stream):
json_schema answers at temperature 0.8 validate, json_object parses, bad or oversized schemas
are 400s naming them, a two-turn tool loop works streamed and not, tool_choice is honoured,
and a constrained seeded stream is identical after its replica dies and another replays it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest

from mesh.transport.auth import sign
from mesh.transport.generated import edgemesh_pb2, edgemesh_pb2_grpc
from tests.conftest import Launcher, gateway_url, wait_for_nodes
from tests.fixtures.node_wire import node_channel

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count"],
          "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}}}
ASK = [{"role": "user", "content": "Pick a colour and a number. Reply in JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 24}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def mesh(module_launcher: Launcher, default_model: Path) -> Iterator[str]:
    # Started one by one (not `edgemesh up`) so that the test knows the cluster key, for the wire check.
    nodes = [module_launcher.node(f"replica-{i}", default_model, "--role", "replica") for i in (1, 2)]
    peers = [a for n in nodes for a in ("--peer", f"127.0.0.1:{n.ready[1]}")]
    url = gateway_url(module_launcher.gateway("gw", default_model, "--no-discovery", *peers))
    wait_for_nodes(url, 2)
    yield url


@pytest.fixture(scope="module")
def client(mesh: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}}


def test_twenty_json_schema_answers_at_temperature_0_8_all_validate(client: openai.OpenAI) -> None:
    answers = set()
    for seed in range(20):
        chat = client.chat.completions.create(model="default", messages=ASK, max_tokens=24, temperature=0.8,
                                              seed=seed, response_format=_schema_format(SCHEMA))
        choice = chat.choices[0]
        assert choice.finish_reason == "stop", choice
        value = json.loads(choice.message.content or "")
        jsonschema.validate(value, SCHEMA)
        answers.add(json.dumps(value))
    assert len(answers) > 1  # sampled, not one forced answer


def test_json_object_parses_as_an_object(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="default", max_tokens=48, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}])
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)


def test_bad_deep_and_big_schemas_are_400s_naming_them(client: openai.OpenAI) -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(3000)}}
    for schema, words in (({"type": "nonsense"}, "response_format"), (deep, "max_schema_depth"),
                          (big, "max_schema_bytes")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="default", messages=ASK, max_tokens=4,
                                           response_format=_schema_format(schema))
        assert words in refused.value.message and "response_format" in refused.value.message, refused.value.message
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="default", messages=ASK, max_tokens=4, tools=[WEATHER],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="default", messages=ASK, max_tokens=4, tools=[  # type: ignore[list-item]
            {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}])
    ok = client.chat.completions.create(model="default", messages=ASK, max_tokens=4, temperature=0)
    assert ok.choices[0].message.content  # and it went on serving


def test_a_bad_grammar_on_the_wire_is_invalid_argument(mesh: str, module_launcher: Launcher) -> None:
    view = httpx.get(f"{mesh}/api/cluster", timeout=10).json()
    key = module_launcher.cluster_key

    async def call(address: str) -> None:
        async with node_channel(address, key) as channel:
            stub = edgemesh_pb2_grpc.NodeStub(channel)
            bad = edgemesh_pb2.GenerateRequest(request_id="r", prompt_tokens=[1, 2], max_tokens=2,
                                               constraint=edgemesh_pb2.Constraint(kind="lark", grammar="start: ("))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stub.Generate(bad, timeout=30, metadata=sign(key, "/edgemesh.v1.Node/Generate", bad)):
                    pass
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "constraint" in (raised.value.details() or "")

    for node in view["nodes"]:
        asyncio.run(call(node["address"]))
    ok = openai.OpenAI(base_url=f"{mesh}/v1", api_key="x", max_retries=0, timeout=60).chat.completions.create(
        model="default", messages=ASK, max_tokens=8, response_format={"type": "json_object"}, temperature=0)
    assert ok.choices[0].message.content


def _check_call(call: Any, tools: dict[str, dict[str, Any]]) -> dict[str, Any]:
    assert call.id.startswith("call_") and call.type == "function"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tools[call.function.name]["parameters"])
    return dict(arguments)


def _streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[dict[str, str]], str | None]:
    """Content, tool calls (OpenAI's delta.tool_calls put together) and finish reason of a stream."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model="default", stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += part.id or ""
            call["name"] += (part.function.name or "") if part.function else ""
            call["arguments"] += (part.function.arguments or "") if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_a_two_turn_tool_loop_whole_and_streamed(client: openai.OpenAI) -> None:
    tools = {"get_weather": WEATHER["function"]}
    first = client.chat.completions.create(model="default", messages=WEATHER_ASK, tools=[WEATHER],  # type: ignore[list-item]
                                           tool_choice="required", max_tokens=40, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls or []) == 1
    call = (choice.message.tool_calls or [])[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    _check_call(call, tools)

    # Streamed, the same call arrives as delta.tool_calls (ids differ, the call does not).
    content, calls, finish = _streamed(client, messages=WEATHER_ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=40, temperature=0)
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)  # type: ignore[union-attr]

    # Turn two: the call and its result go back through the template; the answer is text or a call.
    history = [*WEATHER_ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'}]
    second = client.chat.completions.create(model="default", messages=history, tools=[WEATHER],  # type: ignore[list-item]
                                            max_tokens=30, temperature=0)
    answer = second.choices[0]
    if answer.finish_reason == "tool_calls":
        for again in answer.message.tool_calls or []:
            _check_call(again, tools)
    else:
        assert answer.message.content and not answer.message.tool_calls
        assert answer.message.content[0] not in "{[ \n"  # the text branch of tool_choice auto
    content, calls, finish = _streamed(client, messages=history, tools=[WEATHER], max_tokens=30, temperature=0)
    assert finish == answer.finish_reason
    if finish == "tool_calls":
        assert [c["name"] for c in calls] == [c.function.name for c in answer.message.tool_calls or []]  # type: ignore[union-attr]
    else:
        assert content == answer.message.content and not calls

    # tool_choice none: the tools are not offered, the answer is text.
    plain = client.chat.completions.create(model="default", messages=history, tools=[WEATHER],  # type: ignore[list-item]
                                           tool_choice="none", max_tokens=12, temperature=0)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_named_and_parallel_tool_choice(client: openai.OpenAI) -> None:
    tools = {"get_weather": WEATHER["function"], "get_time": TIME["function"]}
    named = client.chat.completions.create(model="default", messages=WEATHER_ASK, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=40, temperature=0.8, seed=3)
    calls = named.choices[0].message.tool_calls or []
    assert named.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_time"]  # type: ignore[union-attr]
    _check_call(calls[0], tools)
    several = client.chat.completions.create(model="default", messages=WEATHER_ASK, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                             tool_choice="required", parallel_tool_calls=True, max_tokens=80,
                                             temperature=0)
    calls = several.choices[0].message.tool_calls or []
    assert several.choices[0].finish_reason == "tool_calls" and len(calls) >= 1
    for call in calls:
        _check_call(call, tools)
    assert len({c.id for c in calls}) == len(calls)


def test_a_constrained_seeded_stream_is_identical_after_its_replica_dies(client: openai.OpenAI,
                                                                          mesh: str) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Describe a dog as a JSON object."}],
                            "max_tokens": 40, "temperature": 0.8, "seed": 11,
                            "response_format": {"type": "json_object"}}

    def stream(on_chunk: Any = None) -> str:
        pieces = []
        raw = client.chat.completions.with_raw_response.create(model="default", stream=True, **body)
        route = raw.headers.get("x-edgemesh-route", "")  # the replica serving it
        for n, chunk in enumerate(raw.parse()):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if on_chunk is not None:
                on_chunk(n, route)
        return "".join(pieces)

    clean = stream()
    killed: list[int] = []
    pid_of = {node["id"]: node["pid"] for node in httpx.get(f"{mesh}/api/cluster", timeout=10).json()["nodes"]}

    def kill_early(n: int, route: str) -> None:
        # Early, by the route header: a client slowed by a busy machine may read its 10th chunk
        # after the replica has sent its last one, and no node is in flight by then.
        if n == 3 and not killed:
            os.kill(pid_of[route], signal.SIGKILL)
            killed.append(pid_of[route])

    assert stream(kill_early) == clean and killed
    metrics = httpx.get(f"{mesh}/metrics", timeout=10).text
    assert 'edgemesh_failovers_total{from="replica",reason="node_error",to="replica"} 1.0' in metrics
