"""How hidden states travel between pipeline stages: their encodings and the choice per link.

f32 is the default and keeps parity with llama.cpp. f16 halves the bytes, q8_0 (ggml's
block layout: an f16 scale and 32 int8 per 32 values of a row) cuts them to 34/128; both
change the numbers the next stage computes with, so they are used only when the user allows
drift (`--activation-dtype f16|q8_0|auto`).

With `auto`, each sender picks for its own link from the least round-trip time the kernel
measured on that TCP connection (TCP_INFO's min_rtt, which the connection's handshake already
gives and which, unlike the smoothed rtt, does not count the peer's time to answer): only the
sender sees its link, and a hop that crosses a slow Wi-Fi link is the one whose bytes cost
time. The choice is made once per connection, so one run's hop never switches encoding
mid-stream.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidInput
from mesh.types import ActivationDType, HiddenDType, StageStep

Q8_BLOCK = 32  # values per q8_0 block
Q8_BLOCK_BYTES = 2 + Q8_BLOCK  # the f16 scale, then the int8 values
# Counts one send of hidden states to the next stage: its wire bytes, step kind, dtype.
CountSent = Callable[[int, str, HiddenDType], None]

# auto: below this round trip a link is a wired LAN or loopback, where f32's bytes cost less
# than the drift is worth; up to the next, Wi-Fi (f16); beyond, a poor link (q8_0). The kernel's
# least round trip of a connection on the emulated profiles (tests/system/test_link_profiles.py):
# ethernet 0.6-1.0 ms, wifi 3.0-6.2 ms, bad-wifi 9.9-24 ms.
AUTO_F32_BELOW_S = 0.002
AUTO_F16_BELOW_S = 0.008

# struct tcp_info (linux/tcp.h), in microseconds: tcpi_rtt (smoothed) after eight u8 and 15
# u32 fields; tcpi_min_rtt (Linux 4.6+) after 24 u32, four u64 and three u32 fields more.
_TCP_INFO_RTT_OFFSET = 8 + 15 * 4
_TCP_INFO_MIN_RTT_OFFSET = 8 + 24 * 4 + 4 * 8 + 3 * 4
_TCP_INFO_BYTES = _TCP_INFO_MIN_RTT_OFFSET + 4


def tcp_rtt_s(sock: socket.socket) -> float | None:
    """The least round trip the kernel measured on a TCP connection (its smoothed one on a
    kernel without min_rtt); None where it cannot say (not TCP)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError):
        return None
    offset = _TCP_INFO_MIN_RTT_OFFSET if len(info) >= _TCP_INFO_BYTES else _TCP_INFO_RTT_OFFSET
    if len(info) < offset + 4:
        return None
    (rtt_us,) = struct.unpack_from("=I", info, offset)
    return rtt_us / 1e6 if rtt_us else None


def dtype_for_link(policy: ActivationDType, rtt_s: float | None) -> HiddenDType:
    """The encoding a sender uses on its link: the policy itself unless it is auto. A link of
    unknown round trip (a gRPC stream) keeps f32."""
    if policy != "auto":
        return policy
    if rtt_s is None or rtt_s < AUTO_F32_BELOW_S:
        return "f32"
    return "f16" if rtt_s < AUTO_F16_BELOW_S else "q8_0"


F16_MAX = 65504.0  # the largest finite f16: a q8_0 scale is one too


def wire_dtype(dtype: HiddenDType, hidden: npt.NDArray[np.float32]) -> HiddenDType:
    """What hidden states are sent as when `dtype` is asked for: q8_0 needs rows of whole
    blocks (else f16), and a value (or a q8_0 scale) beyond f16's range goes as f32 rather
    than as an infinity the next stage would refuse."""
    if dtype == "f32" or hidden.size == 0:
        return dtype
    if dtype == "q8_0" and hidden.shape[-1] % Q8_BLOCK:
        dtype = "f16"
    largest = float(np.abs(hidden).max())
    limit = F16_MAX * 127.0 if dtype == "q8_0" else F16_MAX
    return dtype if largest <= limit or not np.isfinite(largest) else "f32"


def q8_0_bytes(n_values: int) -> int:
    return n_values // Q8_BLOCK * Q8_BLOCK_BYTES


def wire_bytes(n_values: int, dtype: HiddenDType) -> int:
    """The bytes `n_values` hidden-state values take on the wire in `dtype` (a wire_dtype)."""
    if dtype == "q8_0":
        return q8_0_bytes(n_values)
    return n_values * (4 if dtype == "f32" else 2)


def step_kind(n_tokens: int) -> str:
    """A step of several tokens is a prefill chunk; one token, a decode step (or a replayed one)."""
    return "prefill" if n_tokens > 1 else "decode"


def encode_q8_0(hidden: npt.NDArray[np.float32]) -> bytes:
    """Rows of a multiple of 32 values as q8_0 blocks: d = max|x| / 127, q = round(x / d)."""
    blocks = np.ascontiguousarray(hidden, dtype=np.float32).reshape(-1, Q8_BLOCK)
    amax = np.abs(blocks).max(axis=1)
    scale = amax / 127.0
    # A NaN or infinity gives its block a NaN scale (the receiver refuses it), not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        quants = np.rint(blocks * inverse[:, None]).astype(np.int8)
    out = np.empty((blocks.shape[0], Q8_BLOCK_BYTES), dtype=np.uint8)
    out[:, :2] = scale.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = quants.view(np.uint8)
    return out.tobytes()


def decode_q8_0(data: bytes, shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    n_tokens, n_embd = shape
    if n_embd % Q8_BLOCK:
        raise InvalidInput(f"hidden states: q8_0 rows need a multiple of {Q8_BLOCK} values, got {n_embd}")
    if len(data) != q8_0_bytes(n_tokens * n_embd):
        raise InvalidInput(f"hidden states: {len(data)} bytes do not match shape {list(shape)} of q8_0")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, Q8_BLOCK_BYTES)
    scale = raw[:, :2].copy().view("<f2").astype(np.float32)
    quants = raw[:, 2:].view(np.int8).astype(np.float32)
    decoded: npt.NDArray[np.float32] = (quants * scale).reshape(shape)
    return decoded


def send_dtype(step: StageStep, rtt_s: float | None, count_sent: CountSent) -> HiddenDType:
    """How a step's hidden states go on a link of round trip `rtt_s`, per the run's policy; the
    send is counted."""
    assert step.hidden is not None
    dtype = wire_dtype(dtype_for_link(step.reply_dtype, rtt_s), step.hidden)
    count_sent(wire_bytes(int(step.hidden.size), dtype), step_kind(step.n_tokens), dtype)
    return dtype
