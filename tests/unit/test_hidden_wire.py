"""Hidden states on the wire (mesh.transport.hidden_wire, convert): the f16 and q8_0 encodings,
the choice per link under --activation-dtype auto, and what a bad tensor gets."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from mesh.errors import InvalidInput
from mesh.transport import convert, hidden_wire
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.types import HiddenDType

RNG = np.random.default_rng(7)


def _roundtrip(hidden: np.ndarray, dtype: HiddenDType) -> tuple[np.ndarray, pb.Tensor]:
    msg = pb.Tensor.FromString(convert.tensor_to_pb(hidden, dtype).SerializeToString())
    return convert.tensor_from_pb(msg), msg


def test_q8_0_is_34_bytes_per_32_values_and_within_half_a_step_of_each_value() -> None:
    hidden = (RNG.normal(size=(5, 576)) * RNG.uniform(0.01, 50, size=(5, 1))).astype(np.float32)
    hidden[2, :32] = 0.0  # a block of zeros: scale 0, decoded exactly
    got, msg = _roundtrip(hidden, "q8_0")
    assert msg.dtype == pb.DTYPE_Q8_0 and len(msg.data) == 5 * 576 // 32 * 34
    assert hidden_wire.wire_bytes(hidden.size, "q8_0") == len(msg.data)
    blocks, decoded = hidden.reshape(-1, 32), got.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    # half a quantisation step, plus the f16 rounding of the scale (2^-11 of it, times 127 steps)
    assert (np.abs(decoded - blocks) <= step * (0.5 + 127 * 2**-11) + 1e-12).all()
    assert (got[2, :32] == 0).all()
    # A hub's head sends on what it was sent: encoding a decoded tensor again changes nothing.
    again, _ = _roundtrip(got, "q8_0")
    assert np.array_equal(again, got)


def test_f16_halves_the_bytes_and_f32_is_exact() -> None:
    hidden = RNG.normal(size=(3, 64)).astype(np.float32)
    exact, msg32 = _roundtrip(hidden, "f32")
    half, msg16 = _roundtrip(hidden, "f16")
    assert np.array_equal(exact, hidden) and len(msg32.data) == 3 * 64 * 4
    assert len(msg16.data) == 3 * 64 * 2 and np.array_equal(half, hidden.astype(np.float16).astype(np.float32))


def test_rows_that_are_not_whole_blocks_or_out_of_f16_range_fall_back() -> None:
    odd = RNG.normal(size=(2, 40)).astype(np.float32)
    assert hidden_wire.wire_dtype("q8_0", odd) == "f16"
    _, msg = _roundtrip(odd, "q8_0")
    assert msg.dtype == pb.DTYPE_F16
    big = np.full((1, 64), 1e5, np.float32)  # beyond f16's 65504: f16 would send infinities
    assert hidden_wire.wire_dtype("f16", big) == "f32"
    assert hidden_wire.wire_dtype("q8_0", big) == "q8_0"  # the scale, 1e5 / 127, is within range
    got, msg = _roundtrip(big, "f16")
    assert msg.dtype == pb.DTYPE_F32 and np.array_equal(got, big)


@pytest.mark.parametrize(("policy", "rtt_ms", "want"), [
    ("f32", 30.0, "f32"), ("f16", 0.01, "f16"), ("q8_0", None, "q8_0"),
    ("auto", None, "f32"), ("auto", 0.05, "f32"), ("auto", 1.9, "f32"),
    ("auto", 5.0, "f16"), ("auto", 7.9, "f16"), ("auto", 8.1, "q8_0"), ("auto", 20.0, "q8_0")])
def test_auto_picks_by_the_links_round_trip(policy: str, rtt_ms: float | None, want: str) -> None:
    rtt_s = None if rtt_ms is None else rtt_ms / 1000
    assert hidden_wire.dtype_for_link(policy, rtt_s) == want  # type: ignore[arg-type]


def test_a_tcp_connection_reports_its_round_trip_and_a_unix_socket_none() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    try:
        for _ in range(3):
            client.sendall(b"x")
            peer.recv(1)
            peer.sendall(b"y")
            client.recv(1)
        rtt = hidden_wire.tcp_rtt_s(client)
        assert rtt is not None and 0 < rtt < 0.002  # loopback: auto keeps f32
    finally:
        for s in (client, peer, server):
            s.close()
    left, right = socket.socketpair()
    try:
        assert hidden_wire.tcp_rtt_s(left) is None
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("spoil", ["short", "long", "odd_row", "auto_tensor", "nan_scale"])
def test_a_bad_q8_0_tensor_is_refused_with_a_clear_error(spoil: str) -> None:
    msg = convert.tensor_to_pb(RNG.normal(size=(2, 64)).astype(np.float32), "q8_0")
    if spoil == "short":
        msg.data = msg.data[:-1]
    elif spoil == "long":
        msg.data += b"\0"
    elif spoil == "odd_row":
        msg.shape[1] = 60
    elif spoil == "auto_tensor":
        msg.dtype = pb.DTYPE_AUTO  # a policy, never a tensor's dtype
    else:
        msg.data = b"\x00\x7e" + msg.data[2:]  # an f16 NaN as the first block's scale
    with pytest.raises(InvalidInput):
        convert.tensor_from_pb(msg)


def test_a_policy_field_takes_every_dtype_and_refuses_unknown_codes() -> None:
    assert convert.activation_dtype_from_pb(pb.DTYPE_UNSPECIFIED, "x") == "f32"
    assert convert.activation_dtype_from_pb(pb.DTYPE_AUTO, "x") == "auto"
    assert convert.activation_dtype_from_pb(pb.DTYPE_Q8_0, "x") == "q8_0"
    with pytest.raises(InvalidInput, match="reply_dtype"):
        convert.activation_dtype_from_pb(99, "reply_dtype")
