"""The step socket's wire (mesh/transport/step_socket.py) over socket.socketpair(): framing,
the mutual cluster-key handshake and the head's StepConnection, with no process and no TLS
(TLS wraps the same bytes; tests/integration/test_step_socket.py covers a real node).
Each case is its own test, so one failure does not hide the others."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from mesh.config import Limits, Timeouts
from mesh.errors import CapacityExhausted, InvalidInput, NotFound, PeerError, Unauthenticated
from mesh.transport import convert
from mesh.transport import step_socket as wire
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.types import LayerRange, ModelSha, SamplingParams, StageOutput, StageStep

KEY = "the-cluster-key"
NODE = "node-a"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    head, node = socket.socketpair()
    try:
        yield head, node
    finally:
        head.close()
        node.close()


def _soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


class Peer:
    """The other end played in a thread, joined (and its error re-raised) by the test."""

    def __init__(self, play: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = play()
            except Exception as exc:  # noqa: BLE001 (handed to the test thread by join())
                self.error = exc

        self._thread = threading.Thread(target=run, name="step-socket-peer", daemon=True)
        self._thread.start()

    def join(self) -> Any:
        self._thread.join(10)
        assert not self._thread.is_alive(), "the peer never finished"
        if self.error is not None:
            raise self.error
        return self.result


def _play_node(sock: socket.socket, node: wire.NodeHandshake) -> bytes:
    """The node's side as node.step_server drives it: HELLO, then feed bytes until a proof."""
    sock.sendall(node.hello())
    while True:
        data = sock.recv(4096)
        if not data:
            raise wire.ConnectionClosed("head closed")
        reply = node.feed(data)
        if reply is not None:
            sock.sendall(reply)
            return reply


# ---------------------------------------------------------------- frames


@pytest.mark.parametrize("kind,payload", [(wire.STEP, b"step bytes"), (wire.OUTPUT, b""),
                                          (wire.ERROR, b"x" * 70_000)])
def test_a_frame_arrives_whole(pair: tuple[socket.socket, socket.socket], kind: int, payload: bytes) -> None:
    head, node = pair
    peer = Peer(lambda: wire.send_frame(node, kind, payload))  # larger than a socket buffer: a thread
    assert wire.read_frame(head, 1 << 20, _soon()) == wire.Frame(kind, payload)
    peer.join()


def test_a_frame_whose_bytes_come_one_at_a_time_is_read_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    frame = struct.pack(">IB", 5, wire.STEP) + b"hello"

    def dribble() -> None:
        for byte in frame:
            node.sendall(bytes([byte]))
            time.sleep(0.005)

    peer = Peer(dribble)
    assert wire.read_frame(head, 100, _soon()) == wire.Frame(wire.STEP, b"hello")
    peer.join()


def test_two_frames_back_to_back_are_read_apart(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    wire.send_frame(node, wire.STEP, b"one")
    wire.send_frame(node, wire.OUTPUT, b"two")
    assert wire.read_frame(head, 100, _soon()) == wire.Frame(wire.STEP, b"one")
    assert wire.read_frame(head, 100, _soon()) == wire.Frame(wire.OUTPUT, b"two")


def test_a_frame_cut_in_its_payload_is_a_closed_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    node.sendall(struct.pack(">IB", 10, wire.STEP) + b"short")
    node.close()
    with pytest.raises(wire.ConnectionClosed):
        wire.read_frame(head, 100, _soon())


def test_a_frame_cut_in_its_header_is_a_closed_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    node.sendall(b"\x00\x00")
    node.close()
    with pytest.raises(wire.ConnectionClosed):
        wire.read_frame(head, 100, _soon())


def test_end_of_stream_before_any_frame_is_a_closed_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    node.close()
    with pytest.raises(wire.ConnectionClosed):
        wire.read_frame(head, 100, _soon())


def test_a_frame_over_the_limit_is_refused_from_its_header(pair: tuple[socket.socket, socket.socket]) -> None:
    """Refused before its payload is read or buffered: the header alone is on the wire."""
    head, node = pair
    node.sendall(struct.pack(">IB", 101, wire.STEP))
    with pytest.raises(InvalidInput, match="101 bytes is larger than the limit of 100"):
        wire.read_frame(head, 100, _soon())


def test_a_frame_at_the_limit_is_taken(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    wire.send_frame(node, wire.STEP, b"y" * 100)
    assert wire.read_frame(head, 100, _soon()).payload == b"y" * 100


def test_a_frame_not_whole_by_its_deadline_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    node.sendall(struct.pack(">IB", 10, wire.STEP) + b"slow")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wire.read_frame(head, 100, time.monotonic() + 0.3)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("error,code,mapped", [
    (InvalidInput("a bad hidden width"), "INVALID_ARGUMENT", InvalidInput),
    (NotFound("no such stage"), "NOT_FOUND", NotFound),
    (CapacityExhausted("every slot is taken"), "RESOURCE_EXHAUSTED", CapacityExhausted),
    (Unauthenticated("wrong key"), "UNAUTHENTICATED", Unauthenticated),
])
def test_an_error_frame_names_its_code_and_maps_back_to_the_same_error(
        pair: tuple[socket.socket, socket.socket], error: Exception, code: str, mapped: type[Exception]) -> None:
    head, node = pair
    wire.send_error(node, error)  # type: ignore[arg-type]
    frame = wire.read_frame(head, 8192, _soon())
    assert frame.kind == wire.ERROR
    assert frame.payload == f"{code}\n{error}".encode()
    back = wire.error_from_frame(frame.payload, "step on x")
    assert isinstance(back, mapped) and str(error) in str(back) and "step on x" in str(back)


def test_an_error_frame_is_capped_at_4096_bytes() -> None:
    frame = wire.error_frame(InvalidInput("z" * 10_000))
    length, kind = struct.unpack(">IB", frame[:5])
    assert kind == wire.ERROR and length == 4096 == len(frame) - 5


@pytest.mark.parametrize("payload", [b"NOT_A_CODE\nwhat", b"lowercase\nwhat", b"", b"\xff\xfe"])
def test_an_error_frame_with_an_unknown_code_is_a_retryable_peer_error(payload: bytes) -> None:
    back = wire.error_from_frame(payload, "step")
    assert type(back) is PeerError and back.retryable


# ---------------------------------------------------------------- handshake


def test_the_handshake_succeeds_when_both_hold_the_key(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    peer = Peer(lambda: _play_node(node, wire.NodeHandshake(KEY, NODE)))
    wire.handshake_as_head(head, KEY, NODE, "test", _soon())
    proof = peer.join()
    assert proof.endswith(NODE.encode())
    # The connection is usable for frames afterwards, both ways.
    wire.send_frame(head, wire.STEP, b"after")
    assert wire.read_frame(node, 100, _soon()).payload == b"after"


def test_the_node_refuses_a_head_without_the_key(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    peer = Peer(lambda: _play_node(node, wire.NodeHandshake(KEY, NODE)))
    with pytest.raises((wire.ConnectionClosed, TimeoutError)):
        wire.handshake_as_head(head, "another-key", NODE, "test", time.monotonic() + 1)
    with pytest.raises(Unauthenticated, match="cluster key check failed"):
        peer.join()


def test_the_head_refuses_a_node_without_the_key(pair: tuple[socket.socket, socket.socket]) -> None:
    """A node that cannot check the head's proof (it lacks the key) and answers with a made-up one."""
    head, node = pair

    def impostor() -> None:
        wire.send_frame(node, wire.HELLO, bytes([wire.VERSION]) + b"n" * wire.NONCE_BYTES)
        wire.read_frame(node, 1000, _soon())
        wire.send_frame(node, wire.PROOF, b"m" * wire.MAC_BYTES + NODE.encode())

    peer = Peer(impostor)
    with pytest.raises(Unauthenticated, match="did not prove it holds the cluster key"):
        wire.handshake_as_head(head, KEY, NODE, "test", _soon())
    peer.join()


def test_the_head_refuses_another_node_of_the_cluster(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    peer = Peer(lambda: _play_node(node, wire.NodeHandshake(KEY, "node-b")))
    with pytest.raises(Unauthenticated, match="the node is node-b, not node-a"):
        wire.handshake_as_head(head, KEY, NODE, "test", _soon())
    peer.join()


@pytest.mark.parametrize("hello", [bytes([wire.VERSION + 1]) + b"n" * wire.NONCE_BYTES,
                                   bytes([wire.VERSION]) + b"n" * (wire.NONCE_BYTES - 1), b""])
def test_the_head_refuses_another_version_or_a_malformed_hello(pair: tuple[socket.socket, socket.socket],
                                                               hello: bytes) -> None:
    head, node = pair
    wire.send_frame(node, wire.HELLO, hello)
    with pytest.raises(PeerError, match="step socket version") as caught:
        wire.handshake_as_head(head, KEY, NODE, "test", _soon())
    assert not caught.value.retryable


def test_the_head_refuses_a_first_frame_that_is_no_hello(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    wire.send_frame(node, wire.OUTPUT, b"")
    with pytest.raises(PeerError, match="unexpected frame kind 4") as caught:
        wire.handshake_as_head(head, KEY, NODE, "test", _soon())
    assert not caught.value.retryable


def test_the_head_takes_a_nodes_error_frame_in_place_of_hello(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    wire.send_error(node, CapacityExhausted("too many step connections"))
    with pytest.raises(CapacityExhausted, match="too many step connections"):
        wire.handshake_as_head(head, KEY, NODE, "test", _soon())


def test_the_head_refuses_an_oversized_handshake_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    node.sendall(struct.pack(">IB", 1 << 20, wire.HELLO))
    with pytest.raises(InvalidInput, match="larger than the limit"):
        wire.handshake_as_head(head, KEY, NODE, "test", _soon())


def test_the_head_gives_up_on_a_silent_node(pair: tuple[socket.socket, socket.socket]) -> None:
    head, _node = pair
    with pytest.raises(TimeoutError):
        wire.handshake_as_head(head, KEY, NODE, "test", time.monotonic() + 0.3)


def _head_proof(node: wire.NodeHandshake, key: str = KEY) -> bytes:
    """The PROOF frame a head holding `key` sends in answer to this node's HELLO."""
    nonce = node.hello()[5 + 1:]
    head_nonce = b"h" * wire.NONCE_BYTES
    payload = head_nonce + wire._mac(key, b"head", nonce, head_nonce)
    return struct.pack(">IB", len(payload), wire.PROOF) + payload


def test_the_node_side_waits_for_a_proof_fed_a_byte_at_a_time() -> None:
    node = wire.NodeHandshake(KEY, NODE)
    proof = _head_proof(node)
    replies = [node.feed(proof[i:i + 1]) for i in range(len(proof))]
    assert replies[:-1] == [None] * (len(proof) - 1)
    assert replies[-1] is not None and replies[-1][4] == wire.PROOF


def test_the_node_side_refuses_a_frame_of_another_kind_from_its_header() -> None:
    node = wire.NodeHandshake(KEY, NODE)
    with pytest.raises(InvalidInput, match="expected the head's proof, got frame kind 3"):
        node.feed(struct.pack(">IB", 48, wire.STEP))


@pytest.mark.parametrize("length", [0, 47, 49, 1 << 30])
def test_the_node_side_refuses_a_proof_of_another_length_from_its_header(length: int) -> None:
    node = wire.NodeHandshake(KEY, NODE)
    with pytest.raises(InvalidInput, match=f"a proof of {length} bytes"):
        node.feed(struct.pack(">IB", length, wire.PROOF))


def test_the_node_side_refuses_bytes_after_the_proof() -> None:
    node = wire.NodeHandshake(KEY, NODE)
    with pytest.raises(InvalidInput, match="sent more before the node answered"):
        node.feed(_head_proof(node) + b"\x00")


def test_the_node_side_refuses_a_proof_replayed_from_another_handshake() -> None:
    """Each node nonce is fresh: a proof recorded on one connection proves nothing on the next."""
    recorded = _head_proof(wire.NodeHandshake(KEY, NODE))
    with pytest.raises(Unauthenticated):
        wire.NodeHandshake(KEY, NODE).feed(recorded)


def test_the_node_side_refuses_a_proof_made_with_another_key() -> None:
    node = wire.NodeHandshake(KEY, NODE)
    with pytest.raises(Unauthenticated):
        node.feed(_head_proof(node, key="another-key"))


def test_every_handshake_uses_a_fresh_nonce() -> None:
    assert wire.NodeHandshake(KEY, NODE).hello() != wire.NodeHandshake(KEY, NODE).hello()


# ---------------------------------------------------------------- the head's connection


WIDTH = 8


def _step(step: int = 1) -> StageStep:
    return StageStep(session_id="s", model_sha256=ModelSha("a" * 64), layers=LayerRange(2, 4), start_position=0,
                     tokens=None, hidden=np.ones((1, WIDTH), dtype=np.float32),
                     sampling=SamplingParams(temperature=0.0), logprobs=False, reply_dtype="f32", step=step)


def _connection(sock: socket.socket, step_timeout_s: float = 5.0) -> wire.StepConnection:
    return wire.StepConnection(sock, "node-a:1", Timeouts(), Limits(), step_timeout_s=step_timeout_s)


def _serve_one(sock: socket.socket, answer: Callable[[StageStep], bytes]) -> Peer:
    """A stage that reads one STEP and writes the bytes `answer` gives for it."""

    def play() -> StageStep:
        frame = wire.read_frame(sock, 1 << 20, _soon())
        assert frame.kind == wire.STEP
        step = convert.stage_step_from_pb(pb.ForwardRequest.FromString(frame.payload))
        sock.sendall(answer(step))
        return step

    return Peer(play)


def _output_frame(output: StageOutput) -> bytes:
    payload = convert.stage_output_to_pb("s", output, "f32").SerializeToString()
    return struct.pack(">IB", len(payload), wire.OUTPUT) + payload


def test_a_step_goes_out_and_its_output_comes_back(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    peer = _serve_one(node, lambda step: _output_frame(StageOutput(step=step.step, token_id=42, logprob=-0.5)))
    out = _connection(head).step(_step(7))
    sent = peer.join()
    assert (out.step, out.token_id, out.logprob) == (7, 42, -0.5)
    assert sent.step == 7 and sent.hidden is not None and sent.hidden.shape == (1, WIDTH)


def test_a_reply_to_another_step_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    peer = _serve_one(node, lambda step: _output_frame(StageOutput(step=step.step + 1, token_id=1)))
    with pytest.raises(PeerError, match="reply to step 3, expected 2") as caught:
        _connection(head).step(_step(2))
    assert not caught.value.retryable
    peer.join()


def test_a_malformed_reply_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    peer = _serve_one(node, lambda step: struct.pack(">IB", 3, wire.OUTPUT) + b"\xff\xff\xff")
    with pytest.raises(PeerError, match="malformed reply") as caught:
        _connection(head).step(_step())
    assert not caught.value.retryable
    peer.join()


def test_a_stages_error_frame_is_its_error(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair
    peer = _serve_one(node, lambda step: wire.error_frame(NotFound("stage 2-4 is not loaded")))
    with pytest.raises(NotFound, match="stage 2-4 is not loaded"):
        _connection(head).step(_step())
    peer.join()


def test_a_stage_that_closes_mid_step_is_a_peer_error(pair: tuple[socket.socket, socket.socket]) -> None:
    head, node = pair

    def close_after_reading() -> None:
        wire.read_frame(node, 1 << 20, _soon())
        node.shutdown(socket.SHUT_RDWR)

    peer = Peer(close_after_reading)
    with pytest.raises(PeerError, match="closed the connection"):
        _connection(head).step(_step())
    peer.join()


def test_a_stage_slower_than_the_step_timeout_is_a_peer_error(pair: tuple[socket.socket, socket.socket]) -> None:
    head, _node = pair
    with pytest.raises(PeerError, match="no reply within"):
        _connection(head, step_timeout_s=0.3).step(_step())


def test_interrupt_from_another_thread_ends_a_step_in_progress(pair: tuple[socket.socket, socket.socket]) -> None:
    head, _node = pair
    link = _connection(head, step_timeout_s=30)
    timer = threading.Timer(0.3, link.interrupt)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(PeerError):
            link.step(_step())
    finally:
        timer.join()
    assert time.monotonic() - started < 5
