"""A seeded sample of the fuzz cases of every surface (tests/fuzz_cases.py; the 10,000-case
run is benchmarks/fuzz.py), against real node and gateway processes on a tiny model: every
answer a typed error or a proper reply, the processes still serving normally afterwards,
and their resident memory within bounds. Then the fixes of what the fuzzing found in the
node's servicer, each checked directly: garbage in a Forward stream, a FetchShard of
countless ranges, an error that quotes a huge shape, and the memory that reloads free.

A failure names its reproducer: `benchmarks/fuzz.py --surface S --seed 18 --case I`."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from mesh.transport import auth
from mesh.transport.channels import SERVICE
from mesh.transport.generated import edgemesh_pb2 as pb
from tests import fuzz_cases as fz
from tests.conftest import Launcher
from tests.fixtures.node_wire import node_channel

pytestmark = pytest.mark.slow

SEED = 18
MEMORY_GROWTH_LIMIT = 50 * 2**20


@pytest.fixture(scope="module")
def mesh(module_launcher: Launcher) -> Iterator[fz.FuzzMesh]:
    model = fz.write_chat_model(module_launcher.workdir / "model")
    # These processes' memory is measured: coverage's tracer (on in `make test`, handed to
    # children through COVERAGE_PROCESS_CONFIG) would add its own growth to theirs.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("COVERAGE_PROCESS_CONFIG", "")
        started = fz.start_mesh(module_launcher, model, with_gateway=True)
    yield started
    started.silent.close()  # the processes are stopped by module_launcher


def failures(report: fz.SurfaceReport) -> str:
    lines = [f"{len(report.failures)} of {report.cases} {report.surface} cases failed:"]
    for index, verdict in report.failures[:12]:
        where = report.reproducer(index) if index >= 0 else "after the run"
        lines.append(f"  {where}\n    {verdict.problem}\n    case: {fz.short(verdict.description, 300)}")
    return "\n".join(lines)


def test_grpc_sample(mesh: fz.FuzzMesh) -> None:
    report = fz.SurfaceReport("grpc", SEED)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    fuzzer = fz.GrpcFuzzer(mesh.target)
    before = fz.rss_bytes(mesh.node.pid)

    def restore(index: int) -> None:
        if index % 25 == 0:
            loop.run_until_complete(fz.restore_node(mesh.target))

    def run(index: int, rng: random.Random) -> fz.Verdict:
        return loop.run_until_complete(fuzzer.run(fz.make_grpc_case(rng, mesh.target), rng))

    try:
        fz.run_cases(report, range(1500), run, before=restore)
        after_run = loop.run_until_complete(fz.node_still_serves(mesh.target))
    finally:
        loop.run_until_complete(fuzzer.close())
        loop.close()
        asyncio.set_event_loop(None)
    assert not report.failures, failures(report)
    assert after_run == "", f"the node no longer serves normally: {after_run}"
    assert fz.rss_bytes(mesh.node.pid) - before < MEMORY_GROWTH_LIMIT


def test_step_socket_sample(mesh: fz.FuzzMesh) -> None:
    report = fz.SurfaceReport("step", SEED)
    pid = mesh.node.pid
    threads = fz.thread_count(pid)
    before = fz.rss_bytes(pid)
    fz.run_cases(report, range(600), lambda _i, rng: fz.run_step_case(fz.make_step_case(rng, mesh.target),
                                                                       mesh.target))
    assert not report.failures, failures(report)
    deadline = time.monotonic() + 10
    while fz.thread_count(pid) > threads + 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # a connection's thread ends just after its connection
    assert fz.thread_count(pid) <= threads + 2, f"{threads} threads before, {fz.thread_count(pid)} after"
    assert asyncio.run(fz.node_still_serves(mesh.target)) == ""
    assert fz.rss_bytes(pid) - before < MEMORY_GROWTH_LIMIT


def test_http_sample(mesh: fz.FuzzMesh) -> None:
    assert mesh.gateway is not None
    report = fz.SurfaceReport("http", SEED)
    before = fz.rss_bytes(mesh.gateway.pid)
    with httpx.Client() as client:
        fz.run_cases(report, range(1000), lambda _i, rng: fz.run_http_case(client, mesh.gateway_url,
                                                                          fz.make_http_case(rng)))
    assert not report.failures, failures(report)
    assert fz.gateway_still_serves(mesh.gateway_url) == ""
    assert fz.rss_bytes(mesh.gateway.pid) - before < MEMORY_GROWTH_LIMIT


@pytest.mark.parametrize("reader", fz.GGUF_READERS)
def test_gguf_header_sample(mesh: fz.FuzzMesh, tmp_path: Path, reader: str) -> None:
    """node.gguf.inspect and the stage engine's header reader on mutated copies of the model."""
    report = fz.SurfaceReport("gguf", SEED)
    fixture = fz.gguf_fixture(mesh.model)
    with fz.allocation_tracing():
        fz.run_cases(report, range(1000),
                     lambda i, rng: fz.run_gguf_case(fz.make_gguf_case(rng, fixture), tmp_path, i, (reader,)))
    assert not report.failures, failures(report)


# ---------------------------------------------------------------------------- what the fuzzing found


async def _forward(target: fz.Target, requests: list[bytes]) -> tuple[grpc.StatusCode, str]:
    async with node_channel(target.address, target.cluster_key) as channel:
        call = channel.stream_stream(SERVICE + "Forward")(
            timeout=10, metadata=auth.sign(target.cluster_key, SERVICE + "Forward"))
        try:
            for request in requests:
                await call.write(request)
                if await call.read() is grpc.aio.EOF:
                    break
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return await call.code(), await call.details() or ""


def test_bytes_that_are_not_a_forward_request_end_the_stream_invalid_argument(mesh: fz.FuzzMesh) -> None:
    """They ended it UNKNOWN, with a traceback in the node's log (gRPC parses each message of
    the stream as the servicer reads it)."""
    code, details = asyncio.run(_forward(mesh.target, [b"\x0a\xff\xff\xff\xff\x0f"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a ForwardRequest" in details
    assert asyncio.run(fz.node_still_serves(mesh.target)) == ""


def test_an_error_quoting_a_huge_shape_still_reaches_the_caller(mesh: fz.FuzzMesh) -> None:
    """The refusal quoted all 100,000 dimensions: a 1.2 MB status message, which the client
    library drops (RESOURCE_EXHAUSTED, "metadata size exceeds hard limit")."""
    step = pb.ForwardRequest(session_id="huge-shape", model_sha256=mesh.target.sha)
    step.layers.first, step.layers.last_exclusive = 1, mesh.target.n_layers
    step.hidden.dtype = pb.DTYPE_F32
    step.hidden.shape.extend([2**32 - 1] * 100_000)
    code, details = asyncio.run(_forward(mesh.target, [step.SerializeToString()]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:300])
    assert "100000 dimensions" in details and len(details) < 600


def test_a_fetch_of_countless_tiny_ranges_is_refused_at_once(mesh: fz.FuzzMesh) -> None:
    """100,000 one-byte ranges of the 300 KB file were served, one reply each (290,000 took
    36 s; 5 million empty ones took a node to 800 MB resident before their refusal)."""
    target = mesh.target
    request = pb.FetchShardRequest(model_sha256=target.sha)
    for index in range(100_000):
        request.ranges.add(offset=index, length=1)
    body = request.SerializeToString()

    async def fetch() -> tuple[grpc.StatusCode, str, int]:
        replies = 0
        async with node_channel(target.address, target.cluster_key) as channel:
            call = channel.unary_stream(SERVICE + "FetchShard")(
                body, timeout=30, metadata=auth.sign(target.cluster_key, SERVICE + "FetchShard", body))
            try:
                async for _chunk in call:
                    replies += 1
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or "", replies
        return grpc.StatusCode.OK, "", replies

    started = time.monotonic()
    code, details, replies = asyncio.run(fetch())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and replies == 0, (code, details, replies)
    assert "at most 16384 byte ranges" in details
    assert time.monotonic() - started < 3


def test_reloading_the_replica_gives_its_memory_back(mesh: fz.FuzzMesh) -> None:
    """Each reload with another context freed llama.cpp's buffers into the loading thread's
    heap, which glibc kept: 60 reloads took the node 21 to 36 MB up (1 MB now), and the
    memory its budget counts as free down by as much."""
    from mesh.config import Limits, Timeouts
    from mesh.transport.channels import NodeClient

    target = mesh.target

    async def reload(times: int) -> None:
        client = NodeClient(target.address, target.cluster_key, Timeouts(), Limits())
        try:
            for index in range(times):
                await client.load_model(target.sha, 8192 if index % 2 == 0 else target.n_ctx, 60, "")
        finally:
            await client.close()

    asyncio.run(fz.restore_node(target))
    asyncio.run(reload(4))  # the first reloads grow the heap to its working size
    before = fz.rss_bytes(mesh.node.pid)
    asyncio.run(reload(60))
    grown = fz.rss_bytes(mesh.node.pid) - before
    assert grown < 10 * 2**20, f"60 reloads left the node {grown / 2**20:.0f} MB larger"
