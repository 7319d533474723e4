"""A real replica mesh on loopback: two `edgemesh node` processes found by mDNS only, and an
`edgemesh gateway` process in front. Checks parity with llama-cpp-python, load sharing,
bad input handling and the cluster view."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Launcher, Proc, gateway_url, sse_events, wait_for_nodes

pytestmark = pytest.mark.slow

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name three primary colours."}],
]
TEXT_PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def mesh(module_launcher: Launcher, default_model: Path) -> tuple[str, list[Proc]]:
    nodes = [module_launcher.node(f"node-{i}", default_model) for i in (1, 2)]
    gateway = module_launcher.gateway("gateway", default_model)  # no --peer: mDNS only
    url = gateway_url(gateway)
    wait_for_nodes(url, 2)
    return url, nodes


def post(url: str, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120, **kwargs)


@pytest.mark.parametrize("messages", CHAT_PROMPTS)
def test_greedy_chat_equals_llama_cpp(mesh: tuple[str, list[Proc]], reference_llm: Any,
                                      messages: list[dict[str, str]]) -> None:
    url, _ = mesh
    reference_llm.reset()  # a fresh evaluation, as every mesh request gets
    expected = reference_llm.create_chat_completion(messages=messages, max_tokens=48, temperature=0)
    got = post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 48, "temperature": 0})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert body["usage"] == expected["usage"]
    assert got.headers["x-edgemesh-route"]


@pytest.mark.parametrize("prompt", TEXT_PROMPTS)
def test_greedy_completion_equals_llama_cpp_streamed_and_not(mesh: tuple[str, list[Proc]],
                                                             reference_llm: Any, prompt: str) -> None:
    url, _ = mesh
    reference_llm.reset()
    expected = reference_llm.create_completion(prompt, max_tokens=40, temperature=0)
    whole = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 40, "temperature": 0})
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["text"] == expected["choices"][0]["text"]
    assert whole.json()["usage"] == expected["usage"]

    streamed = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 40, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed)
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert text == expected["choices"][0]["text"]
    assert events[-1]["usage"] == expected["usage"]
    assert [e["choices"][0]["finish_reason"] for e in events if e.get("choices")][-1] == "length"


def test_stop_string_ends_the_answer(mesh: tuple[str, list[Proc]], reference_llm: Any) -> None:
    url, _ = mesh
    reference_llm.reset()
    full = reference_llm.create_completion("One, two, three,", max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = full.split()[1] if len(full.split()) > 1 else full.strip()[:2]
    got = post(url, "/v1/completions", {"prompt": "One, two, three,", "max_tokens": 20, "temperature": 0,
                                        "stop": [stop]}).json()
    assert got["choices"][0]["text"] == full[:full.index(stop)]
    assert got["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_repeatable(mesh: tuple[str, list[Proc]]) -> None:
    url, _ = mesh
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.9, "seed": 1234}
    first = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    second = post(url, "/v1/completions", body).json()["choices"][0]["text"]
    other = post(url, "/v1/completions", {**body, "seed": 99}).json()["choices"][0]["text"]
    assert first == second
    assert first != other


def test_both_nodes_serve_under_concurrent_load(mesh: tuple[str, list[Proc]]) -> None:
    url, nodes = mesh

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post(f"{url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"Count to {i + 3}."}], "max_tokens": 24,
            "temperature": 0})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=180) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    routes = {r.headers["x-edgemesh-route"] for r in responses}
    node_ids = {n.ready[3] for n in nodes}
    assert routes == node_ids, f"expected both nodes {node_ids} to serve, got {routes}"


BAD_BODIES = [
    ("missing messages", "/v1/chat/completions", {"max_tokens": 5}),
    ("messages wrong type", "/v1/chat/completions", {"messages": "hello"}),
    ("max_tokens negative", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}),
    ("temperature a string", "/v1/completions", {"prompt": "hi", "temperature": "hot"}),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("top_p out of range", "/v1/completions", {"prompt": "hi", "top_p": 7}),
    ("wrong model", "/v1/completions", {"prompt": "hi", "model": "gpt-17"}),
    ("prompt longer than the context", "/v1/completions", {"prompt": "word " * 5000, "max_tokens": 4}),
]


@pytest.mark.parametrize("case,path,body", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_malformed_requests_get_4xx_and_the_gateway_keeps_serving(
        mesh: tuple[str, list[Proc]], case: str, path: str, body: dict[str, Any]) -> None:
    url, _ = mesh
    response = post(url, path, body)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    error = response.json()["error"]
    assert error["message"] and error["type"]
    ok = post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200


def test_invalid_json_and_unknown_routes(mesh: tuple[str, list[Proc]]) -> None:
    url, _ = mesh
    broken = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=10,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/nothing", timeout=10).status_code == 404
    assert httpx.get(f"{url}/v1/chat/completions", timeout=10).status_code == 405


def test_models_cluster_health_and_metrics(mesh: tuple[str, list[Proc]], default_model: Path) -> None:
    url, nodes = mesh
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == default_model.stem
    view = httpx.get(f"{url}/api/cluster", timeout=10).json()
    by_id = {n["id"]: n for n in view["nodes"]}
    for proc in nodes:
        node = by_id[proc.ready[3]]
        assert node["state"] == "ready" and node["role"] == "replica"
        assert node["pid"] == proc.pid
        assert node["layers"] == [0, 30]
        assert node["memory_total"] > node["memory_free"] > 0
        assert node["models"][0]["n_layers"] == 30 and len(node["models"][0]["sha256"]) == 64
        assert node["address"] == f"127.0.0.1:{proc.ready[1]}"
    kinds = {(p["kind"], p["stages"][0]["node"], tuple(p["stages"][0]["layers"])) for p in view["placements"]}
    assert kinds == {("replica", p.ready[3], (0, 30)) for p in nodes}
    assert httpx.get(f"{url}/healthz", timeout=10).json()["nodes_ready"] == 2
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for name in ("edgemesh_requests_total", "edgemesh_time_to_first_token_seconds_bucket",
                 "edgemesh_tokens_generated_total", "edgemesh_request_duration_seconds_bucket",
                 "edgemesh_in_flight_requests", "edgemesh_mesh_node_up"):
        assert name in metrics, name
    node_metrics = httpx.get(f"http://127.0.0.1:{nodes[0].ready[2]}/metrics", timeout=10).text
    for name in ("edgemesh_node_up 1.0", "edgemesh_node_memory_bytes", "edgemesh_node_tokens_generated_total"):
        assert name in node_metrics, name


def test_a_gateway_with_another_cluster_key_sees_no_nodes(launcher: Launcher, mesh: tuple[str, list[Proc]],
                                                          default_model: Path) -> None:
    # `launcher` has a different cluster key from the module's mesh: the nodes' mDNS records
    # carry another cluster hash, so this gateway must ignore them.
    stranger = launcher.gateway("stranger", default_model)
    url = gateway_url(stranger)
    import time

    time.sleep(3)
    view = httpx.get(f"{url}/api/cluster", timeout=10).json()
    assert view["nodes"] == []
    response = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 503
    assert "node" in response.json()["error"]["message"]


def test_a_static_peer_with_the_wrong_key_is_marked_unauthenticated(
        launcher: Launcher, mesh: tuple[str, list[Proc]], default_model: Path) -> None:
    _, nodes = mesh
    stranger = launcher.gateway("stranger", default_model, "--peer", f"127.0.0.1:{nodes[0].ready[1]}",
                                "--no-discovery")
    url = gateway_url(stranger)
    import time

    deadline = time.monotonic() + 20
    state = None
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/api/cluster", timeout=10).json()
        state = view["nodes"][0]["state"] if view["nodes"] else None
        if state == "unauthenticated":
            break
        time.sleep(0.2)
    assert state == "unauthenticated"
    # Another key is another cluster CA: the TLS handshake fails, before any call is made
    # (so the node's signature-check counter does not see it), and the reason says so.
    assert "CERTIFICATE_VERIFY_FAILED" in view["nodes"][0]["reason"], view["nodes"][0]


def test_api_key_is_required_when_set(launcher: Launcher, default_model: Path) -> None:
    guarded = launcher.gateway("guarded", default_model, "--api-key", "s3cret", "--no-discovery")
    url = gateway_url(guarded)
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=10).status_code == 200
    # Health stays open without the key: liveness 200; readiness 503 (this gateway has no node).
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 503


def test_json_error_bodies_are_openai_shaped(mesh: tuple[str, list[Proc]]) -> None:
    url, _ = mesh
    body = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 0}).json()
    assert set(body["error"]) >= {"message", "type", "code"}
    json.dumps(body)
