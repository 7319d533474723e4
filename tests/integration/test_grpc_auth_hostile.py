"""A LAN attacker against a real node's gRPC port (issue 18): a captured signature is good
for one call with its own body only (replayed, or sent with another Generate/LoadStage/
RunPipeline body, it is refused UNAUTHENTICATED); "nan"/"inf" times are refused; unsigned
60 MB calls are refused from their headers without the node reading (buffering) them; an
oversized signed message is RESOURCE_EXHAUSTED; and through all of it the node answers
signed calls and counts every refusal."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.config import Limits, Timeouts
from mesh.transport import auth
from mesh.transport.channels import SERVICE, NodeClient
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.generated import edgemesh_pb2_grpc as pb_grpc
from tests.conftest import Launcher, Proc, metric_lines
from tests.fixtures.node_wire import node_channel
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

pytestmark = pytest.mark.slow

BIG = 60_000_000  # bytes of one hostile call; six at once took a node from 537 to 890 MB before the fix
MAX_MESSAGE = Limits().max_message_bytes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real GGUF: these cases are of the signature check in front of the model."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", SPECS[0])


@pytest.fixture(scope="module")
def node(module_launcher: Launcher, tiny_model: Path) -> Proc:
    return module_launcher.node("target", tiny_model)


@pytest.fixture(scope="module")
def key(module_launcher: Launcher) -> str:
    return module_launcher.cluster_key


def channel_to(proc: Proc, key: str) -> grpc.aio.Channel:
    """Through the cluster's TLS, as a member would: these cases are about the signature
    check behind it (a caller without the key gets no further than the TLS handshake, see
    test_node_tls). The attacker's side may send messages as large as it likes."""
    return node_channel(f"127.0.0.1:{proc.ready[1]}", key,
                        options=[("grpc.max_send_message_length", 2 * MAX_MESSAGE)])


async def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with (a unary call awaited, a stream read to its end)."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def auth_failures(proc: Proc) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{proc.ready[2]}/metrics", timeout=10).read().decode()
    return sum(metric_lines(text, "edgemesh_node_auth_failures_total").values())


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(li for li in status if li.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@contextmanager
def peak_rss(pid: int) -> Iterator[list[float]]:
    """Samples a process's resident memory every 10 ms while the block runs; yields a list
    that holds the peak (MB) once the block is done."""
    peak = [rss_mb(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        time.sleep(0.3)  # whatever the node buffered stays resident a moment after the call ends
        stop.set()
        sampler.join()


async def signed_info_works(proc: Proc, key: str) -> None:
    client = NodeClient(f"127.0.0.1:{proc.ready[1]}", key, Timeouts(), Limits())
    try:
        info = await client.info()
        assert info.node_id == proc.ready[3]
    finally:
        await client.close()


def generate(prompt: list[int]) -> Any:
    return pb.GenerateRequest(request_id="hostile", prompt_tokens=prompt, max_tokens=4)


def load_stage(first: int, last: int) -> Any:
    return pb.LoadStageRequest(model_sha256="ab" * 32, layers=pb.LayerRange(first=first, last_exclusive=last),
                               n_ctx=256, slots=1)


def run_pipeline(request_id: str) -> Any:
    return pb.RunPipelineRequest(request=pb.GenerateRequest(request_id=request_id, prompt_tokens=[1], max_tokens=2))


@pytest.mark.parametrize("method,signed,altered", [
    ("Generate", generate([1, 50, 100]), generate([1, 99, 99, 99])),
    ("LoadStage", load_stage(0, 31), load_stage(10, 15)),
    ("RunPipeline", run_pipeline("one"), run_pipeline("another")),
], ids=["Generate", "LoadStage", "RunPipeline"])
def test_a_captured_signature_is_refused_with_another_body_and_on_replay(
        node: Proc, key: str, method: str, signed: Any, altered: Any) -> None:
    async def scenario() -> None:
        async with channel_to(node, key) as channel:
            stub = pb_grpc.NodeStub(channel)
            captured = auth.sign(key, SERVICE + method, signed)
            code, detail = await outcome(getattr(stub, method)(altered, metadata=captured, timeout=30))
            assert (code, detail) == (grpc.StatusCode.UNAUTHENTICATED,
                                      "cluster key check failed: request body does not match its signature")
            # Sent as captured, it is a replay: the first use spent its nonce.
            fresh = auth.sign(key, SERVICE + method, signed)
            code, detail = await outcome(getattr(stub, method)(signed, metadata=fresh, timeout=30))
            assert code != grpc.StatusCode.UNAUTHENTICATED, detail  # the node's own answer to the call
            code, detail = await outcome(getattr(stub, method)(signed, metadata=fresh, timeout=30))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in detail, detail

    before = auth_failures(node)
    asyncio.run(scenario())
    assert auth_failures(node) - before == 2


def test_a_replayed_forward_stream_is_refused(node: Proc, key: str) -> None:
    """A stream's frames cannot be bound in its headers, but its nonce stops a replay of the call."""
    async def scenario() -> None:
        async with channel_to(node, key) as channel:
            stub = pb_grpc.NodeStub(channel)
            meta = auth.sign(key, SERVICE + "Forward")
            step = pb.ForwardRequest(session_id="s", model_sha256="ab" * 32, step=1,
                                     layers=pb.LayerRange(first=0, last_exclusive=5),
                                     tokens=pb.TokenIds(ids=[1, 2]))
            for attempt in range(2):
                call = stub.Forward(timeout=30, metadata=meta)
                # The replay is refused from its headers alone, so it sends no step: a write racing
                # the node's refusal may end the call INTERNAL on the client's side instead.
                if attempt == 0:
                    await call.write(step)
                code, detail = await outcome(call)
                if attempt == 0:  # the node's own verdict: it holds no such stage
                    assert code == grpc.StatusCode.NOT_FOUND, detail
                else:
                    assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in detail, detail

    asyncio.run(scenario())


@pytest.mark.parametrize("timestamp", ["nan", "inf", "-inf"])
def test_a_non_finite_signature_time_is_refused(node: Proc, key: str, timestamp: str) -> None:
    async def scenario() -> tuple[grpc.StatusCode, str]:
        request = pb.InfoRequest(challenge=b"c" * 16)
        # A correct HMAC over the time "nan": only the clock check stands in the way.
        meta = auth.sign(key, SERVICE + "Info", request, now=float(timestamp))
        assert dict(meta)[auth.TS_HEADER] == timestamp
        async with channel_to(node, key) as channel:
            return await outcome(pb_grpc.NodeStub(channel).Info(request, metadata=meta, timeout=10))

    assert asyncio.run(scenario()) == (grpc.StatusCode.UNAUTHENTICATED,
                                       "cluster key check failed: malformed signature timestamp")


def test_unsigned_60mb_calls_are_refused_without_being_read(launcher: Launcher, tiny_model: Path) -> None:
    # A node of its own, measured within seconds of its start: an idle node re-probes its
    # decode speed from 15 s on (loading the model), which would swamp the figure.
    node = launcher.node("measured", tiny_model)
    key = launcher.cluster_key
    ready_at = time.monotonic()
    hostile = pb.InfoRequest(challenge=b"\x00" * BIG)

    async def unsigned_calls() -> list[tuple[grpc.StatusCode, str]]:
        channels = [channel_to(node, key) for _ in range(6)]  # one connection each, as six attackers would
        try:
            return await asyncio.gather(*(outcome(pb_grpc.NodeStub(ch).Info(hostile, timeout=30))
                                          for ch in channels))
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))

    async def warm_up() -> None:  # the node's first calls allocate gRPC's own buffers and threads
        for _ in range(3):
            async with channel_to(node, key) as channel:
                await outcome(pb_grpc.NodeStub(channel).Info(pb.InfoRequest(challenge=b"\x00" * 1000), timeout=10))
        await signed_info_works(node, key)

    asyncio.run(warm_up())
    before_failures = auth_failures(node)
    baseline = rss_mb(node.pid)
    started = time.monotonic()
    with peak_rss(node.pid) as peak:
        results = asyncio.run(unsigned_calls())
    elapsed = time.monotonic() - started
    growth = peak[0] - baseline
    print(f"six unsigned {BIG / 1e6:.0f} MB calls: node RSS {baseline:.0f} MB -> peak {peak[0]:.0f} MB "
          f"(+{growth:.1f} MB), {elapsed:.2f} s")
    assert time.monotonic() - ready_at < 15, "measured too late: a speed re-probe may have run meanwhile"
    assert results == [(grpc.StatusCode.UNAUTHENTICATED, "cluster key check failed: missing cluster-key signature")] * 6
    assert growth < 50, f"the node buffered the unsigned calls: +{growth:.0f} MB resident"
    assert auth_failures(node) - before_failures == 6
    asyncio.run(signed_info_works(node, key))


def test_an_oversized_signed_message_is_resource_exhausted(node: Proc, key: str) -> None:
    async def scenario() -> tuple[grpc.StatusCode, str]:
        request = pb.InfoRequest(challenge=b"\x00" * (MAX_MESSAGE + 1))
        async with channel_to(node, key) as channel:
            return await outcome(pb_grpc.NodeStub(channel).Info(
                request, metadata=auth.sign(key, SERVICE + "Info", request), timeout=30))

    code, detail = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, detail
    asyncio.run(signed_info_works(node, key))


def test_a_signed_single_message_request_over_the_request_limit_is_refused_unparsed(node: Proc, key: str) -> None:
    """Under the transport's 64 MiB but over Limits.max_request_bytes (4 MiB): only Forward
    carries bulk, and parsing a large message costs several times its size."""
    async def scenario() -> tuple[grpc.StatusCode, str]:
        request = pb.LoadModelRequest(model_sha256="ab" * 32, controller_id="x" * (8 * 2**20))
        async with channel_to(node, key) as channel:
            return await outcome(pb_grpc.NodeStub(channel).LoadModel(
                request, metadata=auth.sign(key, SERVICE + "LoadModel", request), timeout=30))

    code, detail = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, detail
    assert "over this node's limit" in detail, detail
    asyncio.run(signed_info_works(node, key))


def test_health_stays_open_and_a_call_signed_without_its_body_is_refused(node: Proc, key: str) -> None:
    async def scenario() -> None:
        async with channel_to(node, key) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.NodeStub(channel)
            request = pb.InfoRequest(challenge=b"c" * 16)
            assert await outcome(stub.Info(request, metadata=auth.sign(key, SERVICE + "Info"), timeout=10)) == \
                (grpc.StatusCode.UNAUTHENTICATED, "cluster key check failed: the request body is not signed")
            # Unsigned, wrongly signed or signed for another method, every shape is refused.
            stranger = auth.sign("not-the-key", SERVICE + "Generate", generate([1]))
            for call in (stub.Generate(generate([1]), timeout=10),
                         stub.Generate(generate([1]), metadata=stranger, timeout=10),
                         stub.Generate(generate([1]), metadata=auth.sign(key, SERVICE + "Info", generate([1])),
                                       timeout=10),
                         stub.Forward(iter(()), timeout=10)):
                code, detail = await outcome(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, detail

    asyncio.run(scenario())
    asyncio.run(signed_info_works(node, key))
