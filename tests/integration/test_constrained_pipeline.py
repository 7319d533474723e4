"""Structured output and tool calls on a 3-stage pipeline (issue 19, parts 4 and 5): the last
stage masks the logits, its matcher fed the generated tokens the head sends with each step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import Launcher, gateway_url, wait_for_pipeline
from tests.integration.test_constrained import ASK, SCHEMA, WEATHER, WEATHER_ASK

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(module_launcher: Launcher, default_model: Path) -> Iterator[openai.OpenAI]:
    proc = module_launcher.start("up-3", ["up", "--strategy", "pipeline", "--nodes", "3", "--port", "0",
                                          "--model", str(default_model)])
    url = gateway_url(proc)
    wait_for_pipeline(url, 3)
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)
    proc.stop()


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
