"""The step socket of a real node process: the same answer as a gRPC Forward step, a mutual
cluster-key handshake, a clear error for bad input while the node goes on serving, a full
stage refusing more sessions and freeing them when their connections end, and a draining
node that waits for open connections and takes no new sessions on them."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mesh.config import Limits, Timeouts
from mesh.errors import CapacityExhausted, EdgeMeshError, InvalidInput, NotFound, PeerError, Unauthenticated
from mesh.transport import step_socket as wire
from mesh.transport.channels import NodeClient
from mesh.transport.step_socket import StepConnection
from mesh.types import LayerRange, ModelSha, SamplingParams, StageStep
from tests.conftest import Launcher
from tests.fixtures.node_wire import step_socket

pytestmark = pytest.mark.slow

LAYERS = LayerRange(15, 30)  # the last stage: hidden states in, a sampled token out
WIDTH = 576  # SmolLM2-135M's hidden size
SLOTS = 3


def _step(sha: str, session: str, hidden: np.ndarray, start: int = 0, step: int = 1,
          layers: LayerRange = LAYERS) -> StageStep:
    return StageStep(session_id=session, model_sha256=ModelSha(sha), layers=layers, start_position=start,
                     tokens=None, hidden=hidden, sampling=SamplingParams(temperature=0.0), logprobs=True,
                     reply_dtype="f32", step=step)


def _raw_connection(port: int, key: str, node_id: str) -> socket.socket:
    """A handshaken connection on which a test writes frames by hand."""
    sock = step_socket(port, key, timeout=10)
    wire.handshake_as_head(sock, key, node_id, "test", time.monotonic() + 10)
    return sock


def _metric(port: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_the_step_socket_answers_as_forward_does_checks_everything_and_frees_sessions(
        launcher: Launcher, default_model: Path) -> None:
    from node.gguf import file_sha256

    sha = file_sha256(default_model)
    proc = launcher.node("stage", default_model, "--role", "stage")
    node_id, metrics_port = proc.ready[3], proc.ready[2]
    timeouts, limits, key = Timeouts(), Limits(), launcher.cluster_key
    rng = np.random.default_rng(7)
    hidden = rng.normal(size=(3, WIDTH)).astype(np.float32)

    async def over_grpc() -> tuple[int, int, float | None]:
        client = NodeClient(f"127.0.0.1:{proc.ready[1]}", key, timeouts, limits)
        try:
            await client.load_stage(sha, LAYERS, n_ctx=64, slots=SLOTS, timeout_s=120)
            port = (await client.info()).step_port
            stream = client.open_forward(step_timeout_s=30)
            try:
                out = await stream.step(_step(sha, "over-grpc", hidden))
            finally:
                stream.close()
            assert out.token_id is not None
            return port, out.token_id, out.logprob
        finally:
            await client.close()

    port, grpc_token, grpc_logprob = asyncio.run(over_grpc())
    assert port > 0

    def connect(cluster_key: str = key, expected: str = node_id) -> StepConnection:
        return StepConnection.open("127.0.0.1", port, cluster_key, expected, timeouts, limits, step_timeout_s=30)

    def sessions_held() -> float:
        return _metric(metrics_port, "edgemesh_node_stage_sessions")

    def wait_until_no_sessions() -> None:
        deadline = time.monotonic() + 10
        while sessions_held() != 0:
            assert time.monotonic() < deadline, "sessions of closed connections were never released"
            time.sleep(0.1)

    # The same step over the socket gives the token and logprob that Forward gave.
    held = [connect() for _ in range(SLOTS)]
    out = held[0].step(_step(sha, "over-socket", hidden))
    assert (out.token_id, out.logprob) == (grpc_token, pytest.approx(grpc_logprob, abs=1e-5))

    # With every slot taken by a live connection, one more session is refused...
    for index, link in enumerate(held[1:], 1):
        assert link.step(_step(sha, f"held-{index}", hidden)).token_id == grpc_token
    assert sessions_held() == SLOTS
    extra = connect()
    with pytest.raises(CapacityExhausted):
        extra.step(_step(sha, "one-too-many", hidden))
    extra.close()
    # ...and closing the connections frees their slots, with no release call.
    for link in held:
        link.close()
    wait_until_no_sessions()

    # Both sides prove the cluster key, and the node is the one the head was told of.
    with pytest.raises(Unauthenticated):
        connect(cluster_key="not-the-cluster-key")
    with pytest.raises(Unauthenticated, match="not someone-else"):
        connect(expected="someone-else")
    assert _metric(metrics_port, "edgemesh_node_auth_failures_total") >= 1

    # Bad steps: a clear error each, on a connection the node then closes.
    bad: list[tuple[StageStep, type[EdgeMeshError]]] = [
        (_step(sha, "wide", rng.normal(size=(1, 100)).astype(np.float32)), InvalidInput),
        (_step(sha, "nan", np.full((1, WIDTH), np.nan, dtype=np.float32)), InvalidInput),
        (_step(sha, "gap", hidden, start=9), InvalidInput),
        (_step(sha, "elsewhere", hidden, layers=LayerRange(10, 30)), NotFound),
        (_step("0" * 64, "other-model", hidden), NotFound),
    ]
    for step, error in bad:
        link = connect()
        with pytest.raises(error):
            link.step(step)
        with pytest.raises(PeerError):  # the node ended the connection after saying why
            link.step(_step(sha, "after", hidden))
        link.close()
    wait_until_no_sessions()

    # Frames no head would send: garbage, an unknown kind, a length past the limit.
    for kind, payload, header_only in ((wire.STEP, b"\xff\xff\xff", False), (99, b"", False),
                                       (wire.STEP, b"x" * 16, True)):
        sock = _raw_connection(port, key, node_id)
        if header_only:
            sock.sendall(wire._HEADER.pack(limits.max_message_bytes + 1, kind))
        else:
            wire.send_frame(sock, kind, payload)
        frame = wire.read_frame(sock, 4096, time.monotonic() + 10)
        assert frame.kind == wire.ERROR and frame.payload.startswith(b"INVALID_ARGUMENT\n"), frame
        sock.close()

    # A connection that never proves the key is not work in flight (a drain would not wait for it).
    async def in_flight() -> int:
        client = NodeClient(f"127.0.0.1:{proc.ready[1]}", key, timeouts, limits)
        try:
            return (await client.info()).in_flight
        finally:
            await client.close()

    silent = step_socket(port, key, timeout=10)
    assert asyncio.run(in_flight()) == 0
    silent.close()

    # The node went on serving through all of it.
    link = connect()
    assert link.step(_step(sha, "still-serving", hidden)).token_id == grpc_token
    link.close()

    # A draining node waits for a connection still open, and takes no new session on it.
    open_link = connect()
    assert open_link.step(_step(sha, "in-flight", hidden)).token_id == grpc_token
    proc.popen.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    assert proc.popen.poll() is None, "the node stopped with a step connection open"
    with pytest.raises(PeerError, match="draining"):
        open_link.step(_step(sha, "new-while-draining", hidden))
    open_link.close()
    assert proc.popen.wait(timeout=30) == 0
    assert "Traceback" not in proc.log()
