"""A cloud outage with `--policy cloud-first`: the cloud is a real OpenAI-compatible server on
loopback (another `edgemesh up`). Answers come from the cloud; when it dies the mesh answers
within 5 s and the metrics say so; a stream cut mid-answer is completed by the mesh; when the
cloud comes back, traffic returns to it after the breaker's probe."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import REPO, Launcher, Proc, gateway_url
from tests.fixtures.openai_standin import StandIn, answer_prefix, run_standin

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 24, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cloud(launcher: Launcher, model: Path, port: int, name: str) -> tuple[Proc, list[int]]:
    cloud = launcher.start(name, ["up", "--nodes", "1", "--port", str(port), "--threads", "1", "--model", str(model)])
    pids = [n["pid"] for n in httpx.get(f"{gateway_url(cloud)}/api/cluster", timeout=10).json()["nodes"]]
    return cloud, pids


def kill_cloud(cloud: Proc, node_pids: list[int]) -> None:
    """An outage, not a shutdown: everything of the cloud dies at once."""
    for pid in [cloud.pid, *node_pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cloud.popen.wait(timeout=10)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def test_cloud_first_survives_a_cloud_outage(launcher: Launcher, default_model: Path) -> None:
    port = free_port()
    cloud, cloud_nodes = start_cloud(launcher, default_model, port, "cloud")
    local = launcher.start("local", ["up", "--nodes", "1", "--port", "0", "--threads", "1",
                                     "--model", str(default_model), "--policy", "cloud-first",
                                     "--cloud-url", f"http://127.0.0.1:{port}/v1"])
    url = gateway_url(local)

    first = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
    assert first.status_code == 200 and first.headers["x-edgemesh-route"] == "cloud"
    view = httpx.get(f"{url}/api/cluster", timeout=10).json()
    assert view["routing"]["policy"] == "cloud-first" and view["routing"]["cloud"]["breaker"] == "closed"
    assert metric(url, "edgemesh_cloud_up") == 1.0

    # The cloud's own logprobs pass through unchanged, whole and streamed (the gateway streams from it).
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)
    direct = openai.OpenAI(base_url=f"{gateway_url(cloud)}/v1", api_key="unused-on-loopback", max_retries=0,
                           timeout=60)
    asked = {"model": "default", "messages": CHAT["messages"], "max_tokens": 6, "temperature": 0,
             "logprobs": True, "top_logprobs": 2}
    via = client.chat.completions.with_raw_response.create(**asked)
    assert via.headers["x-edgemesh-route"] == "cloud"
    expected = direct.chat.completions.create(**asked).choices[0].logprobs
    assert expected is not None and expected.content and len(expected.content) == 6
    assert via.parse().choices[0].logprobs == expected
    streamed = [entry for chunk in client.chat.completions.create(**asked, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content or []]
    assert streamed == expected.content

    # The cloud dies mid-answer: the mesh completes the stream, which ends normally.
    long_chat = {**CHAT, "max_tokens": 200, "stream": True}
    received: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long_chat, timeout=120) as response:
        assert response.headers["x-edgemesh-route"] == "cloud"
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("choices"):
                received.append(event["choices"][0]["delta"].get("content") or "")
                finish = event["choices"][0]["finish_reason"]
            if len(received) == 6:
                kill_cloud(cloud, cloud_nodes)
    assert finish in ("stop", "length") and len("".join(received)) > len("".join(received[:6]))
    assert metric(url, 'edgemesh_failovers_total{from="cloud",reason="cloud_broken",to="mesh"}') == 1.0

    # With the cloud gone, the next request is answered by the mesh within 5 s.
    started = time.monotonic()
    after = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
    assert after.status_code == 200 and after.headers["x-edgemesh-route"] != "cloud"
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 10
    while metric(url, "edgemesh_cloud_up") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(url, "edgemesh_cloud_up") == 0.0
    assert metric(url, 'edgemesh_failovers_total{from="cloud",reason="cloud_connect",to="mesh"}') >= 1.0

    # More failures open the breaker: requests skip the cloud without trying it.
    for _ in range(3):
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60).status_code == 200
    assert httpx.get(f"{url}/api/cluster", timeout=10).json()["routing"]["cloud"]["breaker"] == "open"
    status = subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--url", url], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert "breaker open" in status.stdout and "last failover" in status.stdout and "DOWN" in status.stdout

    # The cloud comes back: after the breaker's probe, answers come from it again.
    start_cloud(launcher, default_model, port, "cloud-again")
    deadline = time.monotonic() + 30
    route = ""
    while time.monotonic() < deadline and route != "cloud":
        route = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60).headers["x-edgemesh-route"]
        time.sleep(0.5)
    assert route == "cloud"
    assert httpx.get(f"{url}/api/cluster", timeout=10).json()["routing"]["cloud"]["breaker"] == "closed"
    assert metric(url, "edgemesh_cloud_up") == 1.0


def answers_from(cloud: StandIn) -> int:
    """Completions the cloud was asked for (its health probes are not answers)."""
    return len([r for r in cloud.received if r.path.endswith("completions")])


def test_local_first_uses_the_cloud_only_when_the_mesh_is_full(launcher: Launcher, default_model: Path) -> None:
    # The cloud here is the in-process stand-in, not a second `edgemesh up`: a second llama.cpp
    # on this 2-core box, decoding beside the filled local node, can take over a minute for a
    # short answer (two 2-thread decoders spin against each other), which is a property of the
    # test machine, not of the routing under test.
    with run_standin() as cloud:
        # One slot (not as many as memory holds): nine requests fill the node.
        local = launcher.start("local", ["up", "--nodes", "1", "--port", "0", "--threads", "1", "--slots", "1",
                                         "--model", str(default_model), "--policy", "local-first",
                                         "--cloud-url", cloud.url])
        url = gateway_url(local)
        plain = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
        assert plain.headers["x-edgemesh-route"] != "cloud" and answers_from(cloud) == 0
        # Fill the local node (1 slot + 8 queued), then one more request goes to the cloud.
        body = {"prompt": "1, 2, 3,", "max_tokens": 80, "temperature": 0}
        routes: list[str] = []

        def fill() -> None:
            answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            routes.append(f"{answer.status_code} {answer.headers.get('x-edgemesh-route')}")

        fillers = [threading.Thread(target=fill) for _ in range(9)]
        for thread in fillers:
            thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            nodes = httpx.get(f"{url}/api/cluster", timeout=10).json()["nodes"]
            if nodes[0]["in_flight"] >= 9:
                break
            time.sleep(0.05)
        overflow = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
        assert overflow.status_code == 200 and overflow.headers["x-edgemesh-route"] == "cloud", \
            (overflow.text, local.log()[-3000:])
        assert overflow.json()["choices"][0]["message"]["content"] == answer_prefix(CHAT["max_tokens"])
        for thread in fillers:
            thread.join(timeout=120)
        # Every filler was answered by the mesh: only the overflow went to the cloud.
        assert len(routes) == 9 and not [r for r in routes if not r.startswith("200") or r.endswith("cloud")], \
            (routes, local.log()[-3000:])
        assert answers_from(cloud) == 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        failovers = [line for line in metrics.splitlines() if line.startswith("edgemesh_failovers_total{")]
        assert failovers == ['edgemesh_failovers_total{from="mesh",reason="no_capacity",to="cloud"} 1.0'], failovers


def test_policy_without_a_cloud_url_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mesh.cli", "gateway", "--port", "0", "--policy", "cloud-first"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "--cloud-url" in done.stderr
    done = subprocess.run([sys.executable, "-m", "mesh.cli", "gateway", "--port", "0", "--cloud-url",
                           "http://127.0.0.1:9/v1", "--cloud-key-env", "EDGEMESH_TEST_NO_SUCH_VAR"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "EDGEMESH_TEST_NO_SUCH_VAR" in done.stderr
