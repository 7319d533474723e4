"""The step socket of a real node process: the same answer as a gRPC Forward step, a mutual
cluster-key handshake, a clear error for bad input while the node goes on serving, a full
stage refusing more sessions and freeing them when their connections end, and a draining
node that waits for open connections and takes no new sessions on them.

One node for the module (the `stage` fixture); each check is its own test, so that one
failure does not hide the others. The drain test ends the node and so runs last."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Stage:
    """The module's node, serving the last stage, and the answer gRPC Forward gave."""

    proc: Any
    sha: str
    key: str
    node_id: str
    metrics_port: str
    port: int  # the step socket's
    hidden: np.ndarray
    grpc_token: int
    grpc_logprob: float | None

    def connect(self, cluster_key: str | None = None, expected: str | None = None) -> StepConnection:
        return StepConnection.open("127.0.0.1", self.port, cluster_key or self.key, expected or self.node_id,
                                   Timeouts(), Limits(), step_timeout_s=30)

    def step(self, session: str, **changes: Any) -> StageStep:
        return _step(self.sha, session, changes.pop("hidden", self.hidden), **changes)

    def sessions_held(self) -> float:
        return _metric(self.metrics_port, "edgemesh_node_stage_sessions")

    def wait_until_no_sessions(self) -> None:
        deadline = time.monotonic() + 10
        while self.sessions_held() != 0:
            assert time.monotonic() < deadline, "sessions of closed connections were never released"
            time.sleep(0.1)

    def serves(self) -> bool:
        """A good step on a new connection still gets Forward's token."""
        link = self.connect()
        try:
            return link.step(self.step("still-serving")).token_id == self.grpc_token
        finally:
            link.close()


@pytest.fixture(scope="module")
def stage(module_launcher: Launcher, default_model: Path) -> Iterator[Stage]:
    from node.gguf import file_sha256

    sha = file_sha256(default_model)
    proc = module_launcher.node("stage", default_model, "--role", "stage")
    timeouts, limits, key = Timeouts(), Limits(), module_launcher.cluster_key
    hidden = np.random.default_rng(7).normal(size=(3, WIDTH)).astype(np.float32)

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
    yield Stage(proc, sha, key, proc.ready[3], proc.ready[2], port, hidden, grpc_token, grpc_logprob)
    assert "Traceback" not in proc.log()


def test_a_step_over_the_socket_answers_as_forward_does(stage: Stage) -> None:
    link = stage.connect()
    try:
        out = link.step(stage.step("over-socket"))
    finally:
        link.close()
    assert (out.token_id, out.logprob) == (stage.grpc_token, pytest.approx(stage.grpc_logprob, abs=1e-5))


def test_a_full_stage_refuses_one_more_session_and_closing_connections_frees_the_slots(stage: Stage) -> None:
    stage.wait_until_no_sessions()
    held = [stage.connect() for _ in range(SLOTS)]
    try:
        for index, link in enumerate(held):
            assert link.step(stage.step(f"held-{index}")).token_id == stage.grpc_token
        assert stage.sessions_held() == SLOTS
        extra = stage.connect()
        try:
            with pytest.raises(CapacityExhausted):
                extra.step(stage.step("one-too-many"))
        finally:
            extra.close()
    finally:
        # Closing the connections frees their slots, with no release call.
        for link in held:
            link.close()
    stage.wait_until_no_sessions()


def test_a_head_without_the_cluster_key_is_refused(stage: Stage) -> None:
    before = _metric(stage.metrics_port, "edgemesh_node_auth_failures_total")
    with pytest.raises(Unauthenticated):
        stage.connect(cluster_key="not-the-cluster-key")
    # The head gives up on the certificate before the node reads its alert: the count follows shortly.
    deadline = time.monotonic() + 10
    while _metric(stage.metrics_port, "edgemesh_node_auth_failures_total") < before + 1:
        assert time.monotonic() < deadline, "the refused head was not counted"
        time.sleep(0.05)
    assert stage.serves()


def test_a_node_other_than_the_one_expected_is_refused(stage: Stage) -> None:
    with pytest.raises(Unauthenticated, match="not someone-else"):
        stage.connect(expected="someone-else")


BAD_STEPS: dict[str, tuple[dict[str, Any], type[EdgeMeshError]]] = {
    "too-wide": ({"hidden": np.random.default_rng(1).normal(size=(1, 100)).astype(np.float32)}, InvalidInput),
    "nan": ({"hidden": np.full((1, WIDTH), np.nan, dtype=np.float32)}, InvalidInput),
    "position-gap": ({"start": 9}, InvalidInput),
    "layers-elsewhere": ({"layers": LayerRange(10, 30)}, NotFound),
}


@pytest.mark.parametrize("case", [*BAD_STEPS, "other-model"])
def test_a_bad_step_gets_a_clear_error_and_the_node_ends_that_connection(stage: Stage, case: str) -> None:
    if case == "other-model":
        step, error = _step("0" * 64, case, stage.hidden), NotFound
    else:
        changes, error = BAD_STEPS[case]
        step = stage.step(case, **changes)
    link = stage.connect()
    try:
        with pytest.raises(error):
            link.step(step)
        with pytest.raises(PeerError):  # the node ended the connection after saying why
            link.step(stage.step("after"))
    finally:
        link.close()
    stage.wait_until_no_sessions()
    assert stage.serves()


@pytest.mark.parametrize("kind,payload,header_only", [(wire.STEP, b"\xff\xff\xff", False), (99, b"", False),
                                                      (wire.STEP, b"x" * 16, True)],
                         ids=["garbage", "unknown-kind", "over-the-limit"])
def test_a_frame_no_head_would_send_gets_invalid_argument(stage: Stage, kind: int, payload: bytes,
                                                          header_only: bool) -> None:
    sock = _raw_connection(stage.port, stage.key, stage.node_id)
    try:
        if header_only:
            sock.sendall(wire._HEADER.pack(Limits().max_message_bytes + 1, kind))
        else:
            wire.send_frame(sock, kind, payload)
        frame = wire.read_frame(sock, 4096, time.monotonic() + 10)
    finally:
        sock.close()
    assert frame.kind == wire.ERROR and frame.payload.startswith(b"INVALID_ARGUMENT\n"), frame
    assert stage.serves()


def test_a_connection_that_never_proves_the_key_is_not_work_in_flight(stage: Stage) -> None:
    """A drain would not wait for it."""

    async def in_flight() -> int:
        client = NodeClient(f"127.0.0.1:{stage.proc.ready[1]}", stage.key, Timeouts(), Limits())
        try:
            return (await client.info()).in_flight
        finally:
            await client.close()

    silent = step_socket(stage.port, stage.key, timeout=10)
    try:
        assert asyncio.run(in_flight()) == 0
    finally:
        silent.close()


def test_a_draining_node_waits_for_an_open_connection_and_takes_no_new_session_on_it(stage: Stage) -> None:
    """Last in the module: it ends the node."""
    open_link = stage.connect()
    try:
        assert open_link.step(stage.step("in-flight")).token_id == stage.grpc_token
        stage.proc.popen.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert stage.proc.popen.poll() is None, "the node stopped with a step connection open"
        with pytest.raises(PeerError, match="draining"):
            open_link.step(stage.step("new-while-draining"))
    finally:
        open_link.close()
    assert stage.proc.popen.wait(timeout=30) == 0
