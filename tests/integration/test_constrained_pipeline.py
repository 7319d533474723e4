"""Structured output and tool calls on a 3-stage pipeline (issue 19, parts 4 and 5): the last
stage masks the logits, its matcher fed the generated tokens the head sends with each step."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import numpy as np
import openai
import pytest

from mesh.transport.auth import sign
from mesh.transport.generated import edgemesh_pb2, edgemesh_pb2_grpc
from tests.conftest import Launcher, gateway_url, wait_for_pipeline
from tests.fixtures.node_wire import node_channel
from tests.integration.test_constrained import ASK, SCHEMA, WEATHER, WEATHER_ASK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(module_launcher: Launcher, default_model: Path) -> Iterator[openai.OpenAI]:
    # Started one by one (not `edgemesh up`) so that the test knows the cluster key, for the wire checks.
    nodes = [module_launcher.node(f"stage-{i}", default_model, "--role", "stage") for i in (1, 2, 3)]
    peers = [a for n in nodes for a in ("--peer", f"127.0.0.1:{n.ready[1]}")]
    gateway = module_launcher.gateway("gw", default_model, "--no-discovery", "--strategy", "pipeline",
                                      "--stages", "3", *peers)
    url = gateway_url(gateway)
    wait_for_pipeline(url, 3)
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


def test_json_schema_answers_validate_on_a_pipeline(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        chat = client.chat.completions.create(model="default", messages=ASK, max_tokens=24, temperature=0.8,
                                              seed=seed, response_format=fmt)  # type: ignore[arg-type]
        assert chat.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(chat.choices[0].message.content or ""), SCHEMA)


def test_a_tool_call_on_a_pipeline_streamed(client: openai.OpenAI) -> None:
    names, arguments, finish = [], "", None
    for chunk in client.chat.completions.create(model="default", messages=WEATHER_ASK, tools=[WEATHER],  # type: ignore[list-item]
                                                tool_choice="required", max_tokens=40, temperature=0, stream=True):
        if chunk.choices:
            for part in chunk.choices[0].delta.tool_calls or ():
                names.append(part.function.name if part.function else None)
                arguments += (part.function.arguments or "") if part.function else ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and names == ["get_weather"]
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_bad_constraints_on_the_wire_are_refused_and_the_stage_keeps_serving(
        client: openai.OpenAI, module_launcher: Launcher, default_model: Path) -> None:
    from node.gguf import file_sha256

    view = httpx.get(f"{str(client.base_url).removesuffix('/v1/')}/api/cluster", timeout=10).json()
    last = view["placements"][0]["stages"][-1]
    address = next(n["address"] for n in view["nodes"] if n["id"] == last["node"])
    sha, key = file_sha256(default_model), module_launcher.cluster_key
    width = 576  # SmolLM2-135M's hidden size

    def step(**fields: Any) -> Any:
        rows = np.zeros((2, width), dtype=np.float32)
        return edgemesh_pb2.ForwardRequest(
            session_id="hostile", start_position=0, model_sha256=sha, step=1,
            layers=edgemesh_pb2.LayerRange(first=last["layers"][0], last_exclusive=last["layers"][1]),
            hidden=edgemesh_pb2.Tensor(shape=[2, width], dtype=edgemesh_pb2.DTYPE_F32, data=rows.tobytes()),
            **fields)

    async def calls() -> None:
        async with node_channel(address, key) as channel:
            stub = edgemesh_pb2_grpc.NodeStub(channel)
            bad_steps = ((step(constraint=edgemesh_pb2.Constraint(kind="lark", grammar="start: (")), "constraint"),
                         (step(constraint=edgemesh_pb2.Constraint(kind="regex", grammar="a+")), "constraint.kind"),
                         (step(constrained_tokens=[5]), "no constraint"))
            for bad, words in bad_steps:
                call = stub.Forward(timeout=30, metadata=sign(key, "/edgemesh.v1.Node/Forward"))
                await call.write(bad)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call.read()
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
                assert words in (raised.value.details() or ""), raised.value.details()

    asyncio.run(calls())
    test_json_schema_answers_validate_on_a_pipeline(client)  # and the pipeline still serves
