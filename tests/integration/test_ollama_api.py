"""Ollama's API on the gateway (issue 19, part 7) through the official `ollama` client and
raw httpx, against a real node and gateway that require an API key; then the requests Open
WebUI sends to an OpenAI connection and to an Ollama connection, replayed, each answered in
the shape Open WebUI parses.

The Open WebUI shapes are based on its source (open-webui/open-webui, backend/open_webui):
routers/ollama.py (GenerateChatCompletionForm: model, messages[{role, content, images,
tool_calls}], format, options, template, stream (default true), keep_alive, tools; its
model list from /api/tags' `models[].model`, names carrying a `:latest` tag; /api/version
to verify a connection), utils/payload.py (convert_payload_openai_to_ollama: sampling
parameters into `options`, max_tokens -> options.num_predict, options.system -> `system`,
options.keep_alive -> `keep_alive`), routers/tasks.py (title and tags generation: a single
user message with the task prompt, stream false, max_tokens 1000 for an Ollama model or
max_completion_tokens 1000 otherwise, and a `metadata` object with task, task_body and
chat_id) and routers/openai.py (GET /v1/models read as data[].id; chat streamed as SSE with
`stream_options` when usage is asked for).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import ollama
import openai
import pytest

from tests.conftest import Launcher, gateway_url, metric_lines, sse_events, wait_for_nodes

pytestmark = pytest.mark.slow

KEY = "k-ollama"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "num_predict": 12, "seed": 1}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "count"],
          "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99}}}
# As the `ollama` client sends it (its Tool model keeps only these keys, in this order), so that
# a raw request offers the same tools in the same prompt.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "The city's name."}}}}}
WEATHER_ASK = [{"role": "user", "content": 'Repeat exactly: {"name": "get_weather", "arguments": {"city": "Paris"}}'}]


@pytest.fixture(scope="module")
def url(module_launcher: Launcher, default_model: Path) -> Iterator[str]:
    module_launcher.node("replica", default_model, "--role", "replica")
    address = gateway_url(module_launcher.gateway("gw", default_model, "--api-key", KEY))
    wait_for_nodes(address, 1, headers=AUTH)
    yield address


@pytest.fixture(scope="module")
def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, headers=AUTH, timeout=120)


@pytest.fixture(scope="module")
def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    assert lines and lines[-1]["done"] is True and all(line["done"] is False for line in lines[:-1])
    return lines


def test_a_key_is_required_as_on_v1(url: str) -> None:
    for method, path in (("GET", "/api/tags"), ("GET", "/api/version"), ("POST", "/api/chat"),
                         ("POST", "/api/generate"), ("POST", "/api/embed"), ("POST", "/api/show")):
        reply = httpx.request(method, f"{url}{path}", json={"model": "default"}, timeout=30)
        assert reply.status_code == 401, (path, reply.text)
        wrong = httpx.request(method, f"{url}{path}", json={"model": "default"}, timeout=30,
                              headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, (path, wrong.text)


def test_tags_version_show(client: ollama.Client, url: str, default_model: Path) -> None:
    from node.gguf import file_sha256

    listed = client.list().models
    names = [m.model for m in listed]
    assert names == [f"{default_model.stem}:latest"]
    entry = listed[0]
    assert entry.size == default_model.stat().st_size and entry.digest == file_sha256(default_model)
    assert entry.details is not None and entry.details.format == "gguf" and entry.details.family == "llama"
    assert entry.details.quantization_level == "Q4_1" and entry.details.parameter_size.endswith("M")
    raw = httpx.get(f"{url}/api/tags", headers=AUTH, timeout=30).json()["models"][0]
    assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(raw)
    version = httpx.get(f"{url}/api/version", headers=AUTH, timeout=30).json()
    assert version["version"].count(".") == 2
    shown = client.show(names[0])
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelinfo is not None and shown.modelinfo["llama.embedding_length"] == 576
    assert shown.template and "embedding" in (shown.capabilities or [])
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3:latest")
    assert missing.value.status_code == 404
    running = httpx.get(f"{url}/api/ps", headers=AUTH, timeout=30).json()["models"]
    assert running and running[0]["model"] == names[0]


def test_chat_streams_ndjson_equal_to_v1(client: ollama.Client, oai: openai.OpenAI, url: str,
                                         default_model: Path) -> None:
    expected = oai.chat.completions.create(model="default", messages=MESSAGES, max_tokens=12, temperature=0, seed=1)
    text = expected.choices[0].message.content
    assert text

    # The official client, streamed (Ollama's default) and not.
    name = f"{default_model.stem}:latest"
    streamed = list(client.chat(model=name, messages=MESSAGES, options=GREEDY, stream=True, keep_alive="5m"))
    assert "".join(part.message.content or "" for part in streamed) == text
    last = streamed[-1]
    assert last.done and last.done_reason == "length" and last.eval_count == expected.usage.completion_tokens
    assert last.prompt_eval_count == expected.usage.prompt_tokens and last.total_duration > 0
    whole = client.chat(model=default_model.stem, messages=MESSAGES, options=GREEDY, stream=False)
    assert whole.message.content == text and whole.message.role == "assistant" and whole.done

    # The raw lines: stream omitted means streamed, NDJSON, each {model, created_at, message, done}.
    reply = httpx.post(f"{url}/api/chat", json={"model": name, "messages": MESSAGES, "options": GREEDY},
                       headers=AUTH, timeout=120)
    lines = ndjson(reply)
    assert all(line["model"] == name and line["created_at"].endswith("Z") for line in lines)
    assert "".join(line["message"]["content"] for line in lines) == text
    assert {"total_duration", "load_duration", "prompt_eval_count", "eval_count", "eval_duration"} <= set(lines[-1])

    # A stop string and a token limit from options, as on /v1.
    first_word = text.split()[0]
    stopped = client.chat(model=name, messages=MESSAGES, stream=False,
                          options={**GREEDY, "stop": [text[len(first_word):len(first_word) + 3]]})
    assert stopped.done_reason == "stop" and text.startswith(stopped.message.content)


def test_generate(client: ollama.Client, oai: openai.OpenAI, url: str, default_model: Path) -> None:
    prompt = "The capital of France is"
    expected = oai.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    raw = client.generate(model=default_model.stem, prompt=prompt, raw=True, options={"temperature": 0,
                                                                                     "num_predict": 8},
                          stream=False)
    assert raw.response == expected and raw.done
    chat_like = list(client.generate(model=default_model.stem, prompt="Say hello.", system="Be brief.",
                                     options=GREEDY, stream=True))
    assert "".join(part.response for part in chat_like) and chat_like[-1].done
    loaded = httpx.post(f"{url}/api/generate", json={"model": default_model.stem}, headers=AUTH, timeout=30).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load"


def test_unknown_or_unimplemented_fields_are_400s_naming_them(client: ollama.Client, url: str,
                                                                default_model: Path) -> None:
    name = default_model.stem
    asks = [
        ({"options": {"mirostat": 2}}, "options.mirostat: unknown field"),
        ({"options": {"num_ctx": 10**6}}, "options.num_ctx"),
        ({"think": True}, "think"),
        ({"template": "{{ .Prompt }}"}, "template"),
        ({"mirror": 1}, "mirror: unknown field"),
        ({"options": {"temperature": "hot"}}, "options.temperature"),
    ]
    for extra, message in asks:
        reply = httpx.post(f"{url}/api/chat", json={"model": name, "messages": MESSAGES, **extra}, headers=AUTH,
                           timeout=30)
        assert reply.status_code == 400, (extra, reply.text)
        assert message in reply.json()["error"], (message, reply.text)
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=name, prompt="hi", options={"num_thread": 4})
    assert refused.value.status_code == 400 and "num_thread" in refused.value.error
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="llama3:latest", messages=MESSAGES)
    assert unknown.value.status_code == 404
    # It went on serving.
    assert client.chat(model=name, messages=MESSAGES, options=GREEDY, stream=False).message.content


def test_embed_equals_v1_embeddings(client: ollama.Client, oai: openai.OpenAI, default_model: Path) -> None:
    texts = ["red", "a long way from home"]
    expected = [np.asarray(d.embedding) for d in oai.embeddings.create(model="default", input=texts).data]
    got = client.embed(model=f"{default_model.stem}:latest", input=texts)
    assert len(got.embeddings) == 2 and got.prompt_eval_count
    for row, want in zip(got.embeddings, expected, strict=True):
        assert np.max(np.abs(np.asarray(row) - want)) < 1e-6
    legacy = client.embeddings(model=default_model.stem, prompt=texts[0])
    assert np.max(np.abs(np.asarray(legacy.embedding) - expected[0])) < 1e-6
    # Ollama truncates an input longer than the context by default; told not to, it is a 400.
    assert len(client.embed(model=default_model.stem, input="word " * 600).embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError, match="longer than"):
        client.embed(model=default_model.stem, input="word " * 600, truncate=False)


def test_metrics_count_ollama_requests_by_key(client: ollama.Client, url: str, default_model: Path) -> None:
    def by_key() -> float:
        text = httpx.get(f"{url}/metrics", timeout=30).text
        return sum(metric_lines(text, "edgemesh_gateway_requests_by_key_total").values())

    before = by_key()
    client.chat(model=default_model.stem, messages=MESSAGES, options={"num_predict": 2}, stream=False)
    client.embed(model=default_model.stem, input="x")
    assert by_key() == before + 2


# ---------------------------------------------------------------- Open WebUI's requests, replayed


def test_open_webui_openai_connection(url: str, default_model: Path) -> None:
    # Verifying the connection and listing models: GET /v1/models, read as data[].id.
    listed = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()
    assert default_model.stem in [m["id"] for m in listed["data"]]
    # A chat turn: streamed, with the parameters a user set and usage asked for.
    body = {"model": default_model.stem, "messages": [{"role": "system", "content": "Be brief."}, *MESSAGES],
            "stream": True, "temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "seed": 3,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as reply:
        reply.read()
    events = sse_events(reply)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert events[-1]["usage"]["completion_tokens"] >= 1
    # Title and tags generation: one user message with the task prompt, not streamed, a token cap
    # and a metadata object; Open WebUI reads choices[0].message.content.
    for task in ("title_generation", "tags_generation"):
        task_body = {"model": default_model.stem, "stream": False, "max_completion_tokens": 1000,
                     "messages": [{"role": "user", "content": f"### Task:\nGenerate a {task}.\n<chat_history>\n"
                                   "USER: Name three colours.\n</chat_history>"}],
                     "metadata": {"task": task, "task_body": {"messages": MESSAGES}, "chat_id": "c-1"}}
        answer = httpx.post(f"{url}/v1/chat/completions", json={**task_body, "max_completion_tokens": 6},
                            headers=AUTH, timeout=120)
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["choices"][0]["message"]["content"], str)


def test_open_webui_ollama_connection(url: str, default_model: Path) -> None:
    name = f"{default_model.stem}:latest"
    version = httpx.get(f"{url}/api/version", headers=AUTH, timeout=30).json()
    assert isinstance(version["version"], str)
    models = httpx.get(f"{url}/api/tags", headers=AUTH, timeout=30).json()["models"]
    assert name in [m["model"] for m in models] and all(m["name"] == m["model"] for m in models)
    # A chat turn as convert_payload_openai_to_ollama builds it: options, keep_alive, system.
    body = {"model": name, "messages": MESSAGES, "stream": True, "keep_alive": "5m", "system": "Be brief.",
            "options": {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 3, "num_predict": 8,
                        "repeat_last_n": 64, "repeat_penalty": 1.1, "min_p": 0.05, "num_ctx": 2048,
                        "stop": ["<|im_end|>"]}}
    lines = ndjson(httpx.post(f"{url}/api/chat", json=body, headers=AUTH, timeout=120))
    assert all(line["message"]["role"] == "assistant" for line in lines)
    assert "".join(line["message"]["content"] for line in lines)
    assert lines[-1]["done_reason"] in ("stop", "length") and lines[-1]["eval_count"] >= 1
    # Title generation over the Ollama connection: not streamed, max_tokens become num_predict.
    title = httpx.post(f"{url}/api/chat", headers=AUTH, timeout=120, json={
        "model": name, "stream": False, "options": {"num_predict": 6},
        "messages": [{"role": "user", "content": "### Task:\nGenerate a concise title.\n<chat_history>\n"
                      "USER: Name three colours.\n</chat_history>"}]})
    assert title.status_code == 200, title.text
    answer = title.json()
    assert answer["done"] is True and isinstance(answer["message"]["content"], str)


# ---------------------------------------------------------------- format and tools


def test_format_json_and_schema(client: ollama.Client, url: str, default_model: Path) -> None:
    name = default_model.stem
    ask = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]
    whole = client.chat(model=name, messages=ask, format="json", options={"temperature": 0, "num_predict": 48},
                        stream=False)
    assert whole.done_reason == "stop" and isinstance(json.loads(whole.message.content or ""), dict)
    streamed = list(client.chat(model=name, messages=ask, format="json", stream=True,
                                options={"temperature": 0, "num_predict": 48}))
    assert "".join(part.message.content or "" for part in streamed) == whole.message.content

    pick = [{"role": "user", "content": "Pick a colour and a number. Reply in JSON."}]
    answers = set()
    for seed in range(4):
        chat = client.chat(model=name, messages=pick, format=SCHEMA, stream=False,
                           options={"temperature": 0.8, "seed": seed, "num_predict": 24})
        assert chat.done_reason == "stop", chat
        value = json.loads(chat.message.content or "")
        jsonschema.validate(value, SCHEMA)
        answers.add(json.dumps(value))
    assert len(answers) > 1  # sampled, not one forced answer
    # /api/generate (through the chat template) takes format too; a raw prompt is refused by name.
    generated = client.generate(model=name, prompt="Pick a colour and a number.", format=SCHEMA, stream=False,
                                options={"temperature": 0.8, "seed": 7, "num_predict": 24})
    jsonschema.validate(json.loads(generated.response), SCHEMA)
    with pytest.raises(ollama.ResponseError) as raw:
        client.generate(model=name, prompt="x", raw=True, format="json", stream=False)
    assert raw.value.status_code == 400 and "format" in raw.value.error and "raw" in raw.value.error


def test_a_bad_format_is_a_400_naming_it(url: str, default_model: Path) -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    for path, fmt, words in (("/api/chat", "yaml", 'format: must be "json"'),
                             ("/api/chat", 5, 'format: must be "json"'),
                             ("/api/chat", {"type": "nonsense"}, "format:"),
                             ("/api/chat", deep, "max_schema_depth"),
                             ("/api/generate", {"type": "nonsense"}, "format:")):
        body = {"model": default_model.stem, "format": fmt, "stream": False, "options": {"num_predict": 4},
                **({"messages": MESSAGES} if path == "/api/chat" else {"prompt": "hi"})}
        reply = httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=30)
        assert reply.status_code == 400, (fmt, reply.text)
        error = reply.json()["error"]
        assert words in error and "format" in error and "response_format" not in error, error
    both = httpx.post(f"{url}/api/chat", headers=AUTH, timeout=30, json={
        "model": default_model.stem, "messages": MESSAGES, "format": "json", "tools": [WEATHER]})
    assert both.status_code == 400 and "format" in both.json()["error"]
    bad_tool = httpx.post(f"{url}/api/chat", headers=AUTH, timeout=30, json={
        "model": default_model.stem, "messages": MESSAGES,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]})
    assert bad_tool.status_code == 400 and "tools" in bad_tool.json()["error"]
    tools_on_generate = httpx.post(f"{url}/api/generate", headers=AUTH, timeout=30, json={
        "model": default_model.stem, "prompt": "hi", "tools": [WEATHER]})
    assert tools_on_generate.status_code == 400 and "tools" in tools_on_generate.json()["error"]


def _ollama_calls(message: Any) -> list[dict[str, Any]]:
    calls = []
    for call in message.tool_calls or ():
        assert isinstance(call.function.arguments, dict)  # an object, not JSON text as on /v1
        jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
        calls.append({"name": call.function.name, "arguments": dict(call.function.arguments)})
    return calls


def test_a_two_turn_tool_loop_streamed_and_not(client: ollama.Client, url: str, default_model: Path) -> None:
    name = default_model.stem
    # Ollama has no tool_choice: tools present is "auto", and SmolLM2-135M rarely chooses a call
    # (greedy, it answers in text). A seed whose sampled answer is a call is looked for; the same
    # seed then draws the same call, streamed or not (a token is a function of request, seed, position).
    for seed in range(16):
        options = {"temperature": 1.5, "seed": seed, "num_predict": 40}
        first = client.chat(model=name, messages=WEATHER_ASK, tools=[WEATHER], options=options, stream=False)
        if first.message.tool_calls:
            break
        assert first.message.content and first.message.content[0] not in "{[ \n"  # the text branch of auto
    calls = _ollama_calls(first.message)
    assert first.done_reason == "stop" and first.message.content == "" and len(calls) == 1, first
    assert calls[0]["name"] == "get_weather"

    # Streamed: the call in one line, then the done line.
    parts = list(client.chat(model=name, messages=WEATHER_ASK, tools=[WEATHER], options=options, stream=True))
    assert len(parts) == 2 and not parts[0].done and parts[1].done and parts[1].done_reason == "stop"
    assert _ollama_calls(parts[0].message) == calls and not parts[1].message.tool_calls
    assert "".join(part.message.content or "" for part in parts) == ""
    raw = ndjson(httpx.post(f"{url}/api/chat", headers=AUTH, timeout=120, json={
        "model": name, "messages": WEATHER_ASK, "tools": [WEATHER], "options": options}))
    assert raw[0]["message"]["tool_calls"] == [{"function": calls[0]}]

    # Turn two: the call (arguments an object) and its result, with tool_name, go back through the
    # template; the answer is text (the text branch of auto) or another call.
    history = [*WEATHER_ASK, first.message,
               {"role": "tool", "tool_name": "get_weather", "content": '{"sky": "sunny", "celsius": 21}'}]
    second = client.chat(model=name, messages=history, tools=[WEATHER], options=options, stream=False)
    assert second.done_reason in ("stop", "length")
    if second.message.tool_calls:
        assert second.message.content == "" and _ollama_calls(second.message)
    else:
        assert second.message.content and second.message.content[0] not in "{[ \n"
    streamed = list(client.chat(model=name, messages=history, tools=[WEATHER], options=options, stream=True))
    assert "".join(part.message.content or "" for part in streamed) == second.message.content
    assert [c for part in streamed for c in _ollama_calls(part.message)] == _ollama_calls(second.message)
    # The fed-back turn changes the prompt: the second answer's prompt is longer than the first's.
    assert (second.prompt_eval_count or 0) > (first.prompt_eval_count or 0)
