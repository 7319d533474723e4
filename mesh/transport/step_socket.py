"""The step socket: a pipeline head's fast path into a later stage for each step.

Why not the gRPC Forward stream: a decode step of a small model takes a few milliseconds
per stage, and on a 2-core device each gRPC-aio hop cost about 0.4 ms of latency plus the
CPU of an event loop and a thread handover on both ends, which ran beside the next stage's
ggml threads and slowed them too (measured: 3 stages on 2 cores, 20 ms per token against
13.5 ms in one process). A plain TCP connection read and written by blocking threads costs
a few microseconds of CPU per hop and wakes nothing else.

What stays the same as Forward: one connection per (pipeline run, stage); the messages are
Forward's own protobuf messages, checked by the same conversion functions; sessions opened
on a connection are freed when it closes, however it closes; an error ends the connection
with a gRPC status code name and a message. gRPC stays for everything else (Info, loads,
whole requests, shards).

Wire format. Every frame is a 4-byte big-endian payload length, a 1-byte kind, the payload.
The connection is TLS 1.3 with certificates of the cluster CA on both ends (see
mesh.transport.tls; plain TCP only under --insecure-plaintext), and the head checks that the
node's certificate names the node id it expects. Inside it, the connection opens with a
mutual cluster-key handshake:

    node -> head   HELLO  version byte + 16-byte node nonce
    head -> node   PROOF  16-byte head nonce + HMAC(key, "head" | node nonce | head nonce)
    node -> head   PROOF  HMAC(key, "node" | head nonce | node nonce | node id) + node id

so neither side sends a step to, or takes one from, a peer without the key, a recorded
handshake cannot be replayed (each side's nonce is fresh), and the head learns that the
node it reached is the one it was told to use. A node gives a connection Timeouts.connect_s
to finish the handshake, however slowly its bytes come, and counts it as one of its step
connections (Limits.max_step_connections) only once the head proved the key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from mesh.config import Limits, Timeouts
from mesh.errors import (
    EdgeMeshError,
    InvalidInput,
    PeerError,
    Unauthenticated,
)
from mesh.transport import convert, hidden_wire, tls
from mesh.transport.channels import error_from_rpc
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.types import HiddenDType, StageOutput, StageStep

VERSION = 1
NONCE_BYTES = 16
MAC_BYTES = 32
MAX_NODE_ID_BYTES = 64

HELLO = 1
PROOF = 2
STEP = 3  # payload: edgemesh.v1.ForwardRequest
OUTPUT = 4  # payload: edgemesh.v1.ForwardReply
ERROR = 5  # payload: "<gRPC status code name>\n<message>", then the sender closes
# The ring (mesh.transport.ring):
RETURN = 6  # head -> last stage, payload: a session id: this connection carries that session's replies
FAILED = 7  # stage -> the stage before, payload: "<node id>\n" + an ERROR payload: a later stage failed

_HEADER = struct.Struct(">IB")
_WATCHED_RECV_S = 0.25
_HANDSHAKE_MAX = 1 + NONCE_BYTES + MAC_BYTES + MAX_NODE_ID_BYTES
_HEAD_PROOF_BYTES = NONCE_BYTES + MAC_BYTES


class ConnectionClosed(PeerError):
    """The other end closed the connection, or it broke."""


@dataclass(frozen=True)
class Frame:
    kind: int
    payload: bytes


def tune(sock: socket.socket, timeouts: Timeouts) -> None:
    """No Nagle delay on small steps, and TCP keepalive as gRPC channels have, so either end
    notices within seconds a peer that vanished (power cut, network split) mid-run."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's keepalive timing applies
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(timeouts.keepalive_time_s)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(timeouts.keepalive_timeout_s)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 1)


def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload), kind) + payload)


def read_frame(sock: socket.socket, max_payload: int, deadline: float,
               before_recv: Callable[[float], None] | None = None) -> Frame:
    """The next frame, whole by `deadline` (time.monotonic()) however slowly its bytes come;
    ConnectionClosed at end of stream, InvalidInput past max_payload, TimeoutError late.
    `before_recv(left)`, when given, is called before each wait for bytes and may raise to
    give up on the frame (a ring stage whose run ended elsewhere)."""
    length, kind = _HEADER.unpack(_read_exact(sock, _HEADER.size, deadline, before_recv))
    if length > max_payload:
        raise InvalidInput(f"a frame of {length} bytes is larger than the limit of {max_payload}")
    return Frame(kind, _read_exact(sock, length, deadline, before_recv))


def _read_exact(sock: socket.socket, size: int, deadline: float,
                before_recv: Callable[[float], None] | None) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        if before_recv is not None and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            before_recv(left)
            left = min(left, _WATCHED_RECV_S)  # back to before_recv soon if only part of a record came
        sock.settimeout(left)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            if before_recv is None:
                raise
            continue  # the deadline is checked above; what part of a TLS record came stays buffered
        if n == 0:
            raise ConnectionClosed("the connection was closed")
        got += n
    return bytes(buffer)


def error_payload(error: EdgeMeshError) -> bytes:
    """An ERROR frame's payload: the gRPC status code name, then the message."""
    code = error.code if isinstance(error, PeerError) else error.grpc_code
    return f"{code}\n{error}".encode()[:4096]


def error_frame(error: EdgeMeshError) -> bytes:
    """The ERROR frame that tells the other end why the connection ends."""
    payload = error_payload(error)
    return _HEADER.pack(len(payload), ERROR) + payload


def send_error(sock: socket.socket, error: EdgeMeshError) -> None:
    sock.sendall(error_frame(error))


def error_from_frame(payload: bytes, what: str) -> EdgeMeshError:
    """The error a node sent, in our hierarchy, mapped as a gRPC status with that code would be."""
    name, _, detail = payload.decode(errors="replace").partition("\n")
    code = getattr(grpc.StatusCode, name, None) if name.isupper() else None
    status = grpc.aio.AioRpcError(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
                                  grpc.aio.Metadata(), grpc.aio.Metadata(), details=detail or name)
    return error_from_rpc(status, what)


def _mac(key: str, *parts: bytes) -> bytes:
    return hmac.new(key.encode(), b"\n".join(parts), hashlib.sha256).digest()


def _expect(frame: Frame, kind: int, what: str) -> bytes:
    if frame.kind == ERROR:
        raise error_from_frame(frame.payload, what)
    if frame.kind != kind:
        raise PeerError(f"{what}: unexpected frame kind {frame.kind}", retryable=False)
    return frame.payload


class NodeHandshake:
    """The node's side of the handshake, fed the bytes as they arrive rather than reading a
    socket, so that one thread can hold every connection still proving the key (see
    node.step_server) and none of them costs a thread of its own.

    The head's PROOF is checked as strictly as its size allows: a frame of another kind or
    length is refused from its 5-byte header, and a head sends nothing after its proof
    until the node has answered, so a byte more is refused too. The buffer never holds
    more than one proof."""

    def __init__(self, key: str, node_id: str) -> None:
        self._key = key
        self._node_id = node_id.encode()
        self._node_nonce = os.urandom(NONCE_BYTES)
        self._buffer = bytearray()

    def hello(self) -> bytes:
        """The node's first frame, sent as soon as the connection is accepted."""
        return _HEADER.pack(1 + NONCE_BYTES, HELLO) + bytes([VERSION]) + self._node_nonce

    def feed(self, data: bytes) -> bytes | None:
        """None while the head's proof is incomplete, then the node's PROOF frame to send;
        InvalidInput for a frame no head sends, Unauthenticated when the head lacks the key."""
        self._buffer += data
        if len(self._buffer) < _HEADER.size:
            return None
        length, kind = _HEADER.unpack_from(self._buffer)
        if kind != PROOF:
            raise InvalidInput(f"step handshake: expected the head's proof, got frame kind {kind}")
        if length != _HEAD_PROOF_BYTES:
            raise InvalidInput(f"step handshake: a proof of {length} bytes, expected {_HEAD_PROOF_BYTES}")
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        if len(self._buffer) > end:
            raise InvalidInput("step handshake: the head sent more before the node answered its proof")
        payload = bytes(self._buffer[_HEADER.size:])
        head_nonce, mac = payload[:NONCE_BYTES], payload[NONCE_BYTES:]
        if not hmac.compare_digest(mac, _mac(self._key, b"head", self._node_nonce, head_nonce)):
            raise Unauthenticated("cluster key check failed on the step socket")
        proof = _mac(self._key, b"node", head_nonce, self._node_nonce, self._node_id) + self._node_id
        return _HEADER.pack(len(proof), PROOF) + proof


def handshake_as_head(sock: socket.socket, key: str, node_id: str, what: str, deadline: float) -> None:
    """The head's side; Unauthenticated when the node lacks the key or is another node."""
    hello = _expect(read_frame(sock, _HANDSHAKE_MAX, deadline), HELLO, what)
    if len(hello) != 1 + NONCE_BYTES or hello[0] != VERSION:
        raise PeerError(f"{what}: step socket version {hello[:1].hex()} is not {VERSION}", retryable=False)
    node_nonce = hello[1:]
    head_nonce = os.urandom(NONCE_BYTES)
    send_frame(sock, PROOF, head_nonce + _mac(key, b"head", node_nonce, head_nonce))
    proof = _expect(read_frame(sock, _HANDSHAKE_MAX, deadline), PROOF, what)
    mac, claimed = proof[:MAC_BYTES], proof[MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, b"node", head_nonce, node_nonce, claimed)):
        raise Unauthenticated(f"{what}: the node did not prove it holds the cluster key")
    if claimed != node_id.encode():
        raise Unauthenticated(f"{what}: the node is {claimed.decode(errors='replace')}, not {node_id}")


class StepConnection:
    """The head's connection to one later stage for one pipeline run; blocking, used from
    the run's driver thread (mesh.pipeline). A step slower than its deadline (first_token_s
    for a prefill chunk, the job's step timeout for one token) counts as a failed stage."""

    def __init__(self, sock: socket.socket, address: str, timeouts: Timeouts, limits: Limits,
                 step_timeout_s: float) -> None:
        self.address = address
        self._sock = sock
        self._timeouts = timeouts
        self._limits = limits
        self._step_timeout_s = step_timeout_s
        # Read once, after the handshake's round trips: a link's encoding of hidden states under
        # --activation-dtype auto is chosen from it, once for the run (mesh.transport.hidden_wire).
        self.rtt_s = hidden_wire.tcp_rtt_s(sock)

    @classmethod
    def open(cls, host: str, port: int, cluster_key: str, node_id: str, timeouts: Timeouts, limits: Limits,
             step_timeout_s: float) -> StepConnection:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        what = f"step socket of {node_id} at {address}"
        credentials = tls.credentials_for(cluster_key)
        try:
            sock = socket.create_connection((host, port), timeout=timeouts.connect_s)
        except OSError as exc:
            raise PeerError(f"{what}: {exc}", node_id=node_id) from exc
        try:
            tune(sock, timeouts)
            deadline = time.monotonic() + timeouts.connect_s
            if credentials is not None:
                # The certificate must name the node we were told to use: a node id is a DNS label.
                sock = credentials.client_context.wrap_socket(sock, server_hostname=node_id)
            handshake_as_head(sock, cluster_key, node_id, what, deadline)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise Unauthenticated(f"{what}: its TLS certificate is not {node_id}'s in this cluster "
                                  f"({exc.verify_message})") from exc
        except (EdgeMeshError, OSError) as exc:
            sock.close()
            if isinstance(exc, EdgeMeshError):
                raise
            raise PeerError(f"{what}: handshake failed: {exc}", node_id=node_id) from exc
        return cls(sock, address, timeouts, limits, step_timeout_s)

    def step(self, step: StageStep, hidden_dtype: HiddenDType = "f32") -> StageOutput:
        wait = self._timeouts.first_token_s if step.n_tokens > 1 else self._step_timeout_s
        what = f"step on {self.address}"
        deadline = time.monotonic() + wait
        try:
            self._sock.settimeout(wait)
            send_frame(self._sock, STEP, convert.stage_step_to_pb(step, hidden_dtype).SerializeToString())
            frame = read_frame(self._sock, self._limits.max_message_bytes, deadline)
        except TimeoutError:
            raise PeerError(f"{what}: no reply within {wait:.0f}s") from None
        except ConnectionClosed:
            raise PeerError(f"{what}: the stage closed the connection") from None
        except OSError as exc:
            raise PeerError(f"{what}: {exc}") from exc
        payload = _expect(frame, OUTPUT, what)
        try:
            output = convert.stage_output_from_pb(pb.ForwardReply.FromString(payload))
        except (DecodeError, InvalidInput) as exc:
            raise PeerError(f"{what}: a malformed reply: {exc}", retryable=False) from exc
        if output.step != step.step:
            raise PeerError(f"{what}: reply to step {output.step}, expected {step.step}", retryable=False)
        return output

    def send(self, kind: int, payload: bytes) -> None:
        """One frame, for the ring, which does not wait for a reply on the same connection."""
        self._sock.settimeout(self._timeouts.connect_s)  # a peer that reads nothing is a failed peer
        send_frame(self._sock, kind, payload)

    def read(self, deadline: float) -> Frame:
        """The next frame the node sent (ConnectionClosed, TimeoutError, OSError as read_frame)."""
        return read_frame(self._sock, self._limits.max_message_bytes, deadline)

    def fileno(self) -> int:
        """For a selector: the head of a ring waits on two connections at once."""
        return self._sock.fileno()

    def buffered(self) -> bool:
        """Bytes already decrypted and waiting, which a selector on the socket does not see."""
        return isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0

    def interrupt(self) -> None:
        """From any thread: end a step in progress at once (its run is being abandoned)."""
        try:
            # The socket's own shutdown, not SSLSocket's: that one also drops the TLS state
            # another thread may be reading through.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def close(self) -> None:
        """The node releases every session opened on this connection when it sees the end."""
        self.interrupt()
        self._sock.close()
