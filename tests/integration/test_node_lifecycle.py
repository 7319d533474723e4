"""Node lifecycle with real processes: cluster-key auth on the wire, drain on SIGTERM,
secure binds, and the health service."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh import PROTOCOL_VERSION
from mesh.config import Limits, Timeouts
from mesh.errors import Unauthenticated
from mesh.transport.channels import NodeClient
from mesh.transport.generated import edgemesh_pb2, edgemesh_pb2_grpc
from tests.conftest import REPO, Launcher, Proc, gateway_url, sse_events, wait_for_nodes
from tests.fixtures.node_wire import node_channel
from tests.fixtures.tiny_gguf import N_LAYER, SPECS, write_tiny_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real GGUF, for the checks of the wire and of auth that need a node, not real output."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", SPECS[0])


@pytest.fixture(scope="module")
def tiny_replica(module_launcher: Launcher, tiny_model: Path) -> Proc:
    """One replica serving the tiny model, shared by the checks that leave it as they found it."""
    return module_launcher.node("node-a", tiny_model, "--role", "replica")


def test_node_rpcs_need_the_cluster_key(module_launcher: Launcher, tiny_replica: Proc) -> None:
    node, launcher = tiny_replica, module_launcher
    address = f"127.0.0.1:{node.ready[1]}"

    async def calls() -> None:
        right = NodeClient(address, launcher.cluster_key, Timeouts(), Limits())
        info = await right.info()
        assert info.node_id == node.ready[3] and info.pid == node.pid
        assert info.models[0].n_layers == N_LAYER and info.memory_total > 0 and info.threads == 1
        assert info.decode_tokens_per_second > 5  # measured by the start-up probe
        await right.close()

        wrong = NodeClient(address, "not-the-key", Timeouts(), Limits())
        with pytest.raises(Unauthenticated):
            await wrong.info()
        await wrong.close()

        # No signature at all, through a raw stub (over the cluster's TLS, as a member would).
        async with node_channel(address, launcher.cluster_key) as channel:
            stub = edgemesh_pb2_grpc.NodeStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Info(edgemesh_pb2.InfoRequest(), timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health stays open to probes (load balancers, systemd) and says SERVING.
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(calls())


def test_bad_generate_requests_get_invalid_argument(module_launcher: Launcher, tiny_replica: Proc) -> None:
    from mesh.transport.auth import sign

    node, launcher = tiny_replica, module_launcher
    address = f"127.0.0.1:{node.ready[1]}"
    method = "/edgemesh.v1.Node/Generate"

    async def calls() -> None:
        async with node_channel(address, launcher.cluster_key) as channel:
            stub = edgemesh_pb2_grpc.NodeStub(channel)
            for bad in (edgemesh_pb2.GenerateRequest(request_id="x", prompt_tokens=[], max_tokens=4),
                        edgemesh_pb2.GenerateRequest(request_id="y", prompt_tokens=[1, 2, 10**8], max_tokens=4),
                        edgemesh_pb2.GenerateRequest(request_id="z", prompt_tokens=[1] * 5000, max_tokens=4)):
                call = stub.Generate(bad, timeout=10, metadata=sign(launcher.cluster_key, method, bad))
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in call:
                        pass
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
            # and it still serves
            good = edgemesh_pb2.GenerateRequest(request_id="ok", prompt_tokens=[1, 50, 100], max_tokens=3)
            events = [e async for e in stub.Generate(good, timeout=30,
                                                     metadata=sign(launcher.cluster_key, method, good))]
            assert len(events) == 3 and events[-1].finish_reason == "length"

    asyncio.run(calls())


def test_sigterm_drains_in_flight_stream_then_exits(launcher: Launcher, default_model: Path) -> None:
    node = launcher.node("node-c", default_model, "--role", "replica")
    gateway = launcher.gateway("gw", default_model, "--peer", f"127.0.0.1:{node.ready[1]}", "--no-discovery")
    url = gateway_url(gateway)
    wait_for_nodes(url, 1)
    result: dict[str, httpx.Response] = {}

    def long_request() -> None:
        result["r"] = httpx.post(f"{url}/v1/completions", timeout=120, json={
            # Long enough (several seconds) to be mid-stream when SIGTERM comes 1.5 s in, and short
            # enough to end within the node's drain time (60 s) also on a loaded machine.
            "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0, "stream": True})

    client = threading.Thread(target=long_request)
    client.start()
    time.sleep(1.5)  # the stream is running
    node.popen.send_signal(signal.SIGTERM)
    # New work is refused at once while the stream finishes.
    time.sleep(1.0)
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503, refused.text
    client.join(timeout=120)
    response = result["r"]
    assert response.status_code == 200
    events = sse_events(response)
    assert "error" not in events[-1]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert node.popen.wait(timeout=60) == 0
    log = node.log()
    assert "draining: 1 request(s) in flight" in log and "stopped" in log


def test_public_gateway_without_api_key_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "mesh.cli", "gateway", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2
    assert "without an API key" in done.stderr and "--api-key" in done.stderr
    done = subprocess.run([sys.executable, "-m", "mesh.cli", "up", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "without an API key" in done.stderr


def test_full_node_is_skipped_and_a_refusal_before_the_first_token_is_retried(
        launcher: Launcher, default_model: Path) -> None:
    """Node A is kept busy by another client, unknown to the gateway: the gateway picks A,
    A refuses with RESOURCE_EXHAUSTED, and the request is retried on B. With both full,
    the client gets a 429 with a clear message at once, not a hang."""
    from mesh.types import GenerationRequest, RequestId, SamplingParams

    nodes = [launcher.node(f"node-{i}", default_model, "--role", "replica", "--slots", "1", "--max-queue", "0")
             for i in (1, 2)]
    peers = [a for n in nodes for a in ("--peer", f"127.0.0.1:{n.ready[1]}")]
    gateway = launcher.gateway("gw", default_model, "--no-discovery", *peers)
    url = gateway_url(gateway)
    wait_for_nodes(url, 2)
    # The gateway breaks ties by node id: occupy the node it would pick first.
    first, second = sorted(nodes, key=lambda n: n.ready[3])
    busy = threading.Event()
    release = threading.Event()

    def occupy(node_address: str) -> None:
        async def hold() -> None:
            client = NodeClient(node_address, launcher.cluster_key, Timeouts(), Limits())
            request = GenerationRequest(
                request_id=RequestId(f"hog-{node_address}"), prompt_tokens=(1, 504, 3458), max_tokens=1500,
                sampling=SamplingParams(temperature=0.0), stop_token_ids=frozenset())
            stream = client.generate(request)
            async for _ in stream:
                busy.set()
                if release.is_set():
                    break
            await stream.aclose()  # type: ignore[attr-defined]
            await client.close()
        asyncio.run(hold())

    hog = threading.Thread(target=occupy, args=(f"127.0.0.1:{first.ready[1]}",))
    hog.start()
    try:
        assert busy.wait(60)
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0},
                        timeout=60)
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-edgemesh-route"] == second.ready[3]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'edgemesh_retries_total{reason="capacity"} 1.0' in metrics

        # Now fill B through the gateway too, and ask once more: both are full.
        long_body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=120) as streaming:
            assert streaming.status_code == 200
            started = time.monotonic()
            full = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
            assert time.monotonic() - started < 10
            assert full.status_code in (429, 503), full.text
            assert "capacity" in full.json()["error"]["message"] or "busy" in full.json()["error"]["message"]
            assert full.headers.get("retry-after")
    finally:
        release.set()
        hog.join(timeout=120)
    after = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert after.status_code == 200


def test_a_cancelled_stream_frees_its_slot_for_the_queued_request(
        launcher: Launcher, default_model: Path) -> None:
    """One slot, one queued: A streams, B waits behind it, A's caller goes away mid-stream.
    B must then run (A's engine slot is free before B takes the node's slot), and a request
    sent the moment B's last token arrives is taken, not refused. Repeated, because the
    cancel can land at any point of A's step."""
    from mesh.types import GenerationRequest, RequestId, SamplingParams

    node = launcher.node("node-q", default_model, "--role", "replica", "--slots", "1", "--max-queue", "1")

    def request(name: str, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(request_id=RequestId(name), prompt_tokens=(1, 504, 3458), max_tokens=max_tokens,
                                 sampling=SamplingParams(temperature=0.0), stop_token_ids=frozenset())

    async def drain(client: NodeClient, name: str, max_tokens: int) -> int:
        stream = client.generate(request(name, max_tokens))
        produced = 0
        async for event in stream:
            produced += 1
            if event.finish_reason:
                break  # as the gateway does: it hangs up at the last token
        await stream.aclose()  # type: ignore[attr-defined]
        return produced

    async def rounds() -> list[tuple[int, int]]:
        client = NodeClient(f"127.0.0.1:{node.ready[1]}", launcher.cluster_key, Timeouts(), Limits())
        results = []
        try:
            for i in range(8):
                first = client.generate(request(f"a-{i}", 400))
                await first.__anext__()  # type: ignore[attr-defined]
                queued = asyncio.create_task(drain(client, f"b-{i}", 3))
                await asyncio.sleep(0.05 * (i % 4))  # B is queued on the node by now
                await first.aclose()  # type: ignore[attr-defined]
                results.append((await queued, await drain(client, f"c-{i}", 2)))
            for i in range(20):  # A ends by itself and its caller hangs up at its last token
                pair = await asyncio.gather(drain(client, f"d-{i}", 2), drain(client, f"e-{i}", 3))
                results.append((pair[1], pair[0]))
        finally:
            await client.close()
        return results

    assert asyncio.run(rounds()) == [(3, 2)] * 28


class _Impostor(edgemesh_pb2_grpc.NodeServicer):  # type: ignore[misc]
    """A real gRPC server that copies a node's public facts but not the cluster key."""

    def __init__(self, sha: str) -> None:
        self._sha = sha

    def Info(self, request: object, context: object) -> object:
        return edgemesh_pb2.NodeInfo(node_id="feedfacefeedface", name="impostor", protocol_version=PROTOCOL_VERSION,
                                     slots=1, max_queue=8, proof="0" * 64,
                                     models=[edgemesh_pb2.ModelHeld(name="x", sha256=self._sha, n_layers=N_LAYER,
                                                                    n_ctx=2048)])


def test_a_node_that_cannot_prove_the_cluster_key_gets_no_work(launcher: Launcher, tiny_model: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from node.gguf import file_sha256

    impostor = grpc.server(ThreadPoolExecutor(max_workers=2))
    edgemesh_pb2_grpc.add_NodeServicer_to_server(_Impostor(file_sha256(tiny_model)), impostor)
    port = impostor.add_insecure_port("127.0.0.1:0")
    impostor.start()
    try:
        gateway = launcher.gateway("gw", tiny_model, "--no-discovery", "--peer", f"127.0.0.1:{port}")
        url = gateway_url(gateway)
        deadline = time.monotonic() + 20
        state = None
        while time.monotonic() < deadline and state != "unauthenticated":
            nodes = httpx.get(f"{url}/api/cluster", timeout=10).json()["nodes"]
            state = nodes[0]["state"] if nodes else None
            time.sleep(0.2)
        assert state == "unauthenticated"
        assert httpx.get(f"{url}/api/cluster", timeout=10).json()["placements"] == []
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "secret", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503
    finally:
        impostor.stop(grace=None)
