"""Cluster-key authentication of node RPCs.

Every call carries four headers: the time it was made, a random nonce, the sha256 of its
serialized request (only for calls with one request message; a request-streaming call
leaves it out), and an HMAC-SHA256 of those and the method under the cluster key. A node
checks them in two steps:

1. From the headers alone, before a byte of the request is read: a missing, malformed or
   non-finite time, a time further than the allowed skew from the node's clock, a wrong
   HMAC, a nonce already used (a replay), or a single-request call without a body digest
   end the call UNAUTHENTICATED. The refusal is a request-streaming handler that never asks
   for a message, so an unsigned 60 MB call costs the node its headers and what the fixed
   HTTP/2 receive window let the sender push ahead (see server.server_options); a handler
   of the method's own unary shape made gRPC read and buffer the whole message first.
2. For calls with one request message, the raw request bytes must hash to the signed
   digest before they are parsed; a captured signature sent with another body (another
   prompt, another LoadStage) ends UNAUTHENTICATED, "request body does not match its
   signature", and the servicer never sees it.

Nonces are remembered until their time leaves the skew window (after which the clock check
refuses them anyway); the memory is bounded: past `capacity` nonces the oldest are
forgotten and every call signed at or before a forgotten one is refused, so nothing is
ever accepted twice, and under a flood of signed calls only the accepted window shrinks.

This is the second check. The first is mutual TLS under the cluster CA (mesh.transport.tls):
every node port speaks only TLS, so a caller without the key never gets a call to this
interceptor, and TLS covers what a header signature cannot (the frames of a Forward stream
after its headers, responses, and confidentiality). The signature stays because it binds
each call's body and nonce under the key inside the encrypted channel, at the cost of an
HMAC per call. The standard health service stays open to any member (it reveals nothing),
and Info's challenge lets a caller check the node (node_proof).

The mDNS record carries only `cluster_hash`, a keyed digest that lets meshes on one LAN
ignore each other without revealing the key.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import inspect
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from mesh.errors import Unauthenticated

TS_HEADER = "x-edgemesh-ts"
NONCE_HEADER = "x-edgemesh-nonce"
BODY_HEADER = "x-edgemesh-body"
SIG_HEADER = "x-edgemesh-sig"

# The standard health service stays open: it reveals nothing and orchestrators probe it.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)

# Strict shapes: every field of the signed text has a fixed alphabet without newlines, so the
# text cannot be read two ways, and "nan", "inf", "1e9" or "1_000" are not times.
_TIMESTAMP = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")
_NONCE = re.compile(r"[0-9a-f]{32}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DOMAIN = "edgemesh rpc v2"


class Serializable(Protocol):
    """A protobuf message (what a gRPC stub serializes and sends)."""

    def SerializeToString(self) -> bytes: ...


@dataclass(frozen=True)
class SignedCall:
    """What an authentic call's headers say."""

    sent_at: float
    nonce: str
    body_sha256: str  # "" when the body is not bound (request-streaming calls)


def cluster_hash(cluster_key: str) -> str:
    """Short public id of a cluster, safe to put in an mDNS TXT record."""
    return hmac.new(cluster_key.encode(), b"edgemesh cluster id", hashlib.sha256).hexdigest()[:12]


def node_proof(cluster_key: str, challenge: bytes, node_id: str) -> str:
    """A node's answer to a caller's challenge: only a holder of the cluster key can make it,
    so an impostor that copied an mDNS record (whose cluster hash is public) is refused."""
    return hmac.new(cluster_key.encode(), b"edgemesh node proof\n" + challenge + node_id.encode(),
                    hashlib.sha256).hexdigest()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _signature(cluster_key: str, timestamp: str, nonce: str, digest: str, method: str) -> str:
    # The method goes last: it is the only field whose alphabet the server does not check.
    message = f"{_DOMAIN}\n{timestamp}\n{nonce}\n{digest}\n{method}".encode()
    return hmac.new(cluster_key.encode(), message, hashlib.sha256).hexdigest()


def sign(cluster_key: str, method: str, request: Serializable | bytes | None = None, *,
         now: float | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata to attach to one call of `method` (full name, e.g. /edgemesh.v1.Node/Info).

    `request` is the call's request message (or its serialized bytes); leave it out only for
    request-streaming methods (Forward), whose body cannot be bound. Metadata is good for
    one call: a node refuses its second use."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    if request is None:
        digest = ""
    else:
        digest = body_digest(request if isinstance(request, bytes) else request.SerializeToString())
    meta = [(TS_HEADER, timestamp), (NONCE_HEADER, nonce)]
    if digest:
        meta.append((BODY_HEADER, digest))
    meta.append((SIG_HEADER, _signature(cluster_key, timestamp, nonce, digest, method)))
    return tuple(meta)


def verify(cluster_key: str, method: str, metadata: dict[str, str], skew_s: float,
           now: float | None = None) -> SignedCall:
    """What an authentic call's headers say; Unauthenticated with the reason otherwise.
    Header-only: does not know whether the nonce was used before (see ReplayGuard)."""
    timestamp = metadata.get(TS_HEADER, "")
    nonce = metadata.get(NONCE_HEADER, "")
    digest = metadata.get(BODY_HEADER, "")
    signature = metadata.get(SIG_HEADER, "")
    if not timestamp or not signature:
        raise Unauthenticated("missing cluster-key signature")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise Unauthenticated("malformed signature timestamp")
    sent = float(timestamp)
    current = time.time() if now is None else now
    if not math.isfinite(sent) or not abs(current - sent) <= skew_s:
        raise Unauthenticated(f"signature time is {current - sent:+.0f}s off this node's clock "
                              f"(limit {skew_s:.0f}s)")
    if not _NONCE.fullmatch(nonce) or (digest and not _SHA256_HEX.fullmatch(digest)) \
            or not _SHA256_HEX.fullmatch(signature):
        raise Unauthenticated("malformed cluster-key signature")
    if not hmac.compare_digest(signature.encode(), _signature(cluster_key, timestamp, nonce, digest,
                                                              method).encode()):
        raise Unauthenticated("wrong cluster key")
    return SignedCall(sent_at=sent, nonce=nonce, body_sha256=digest)


class ReplayGuard:
    """The nonces of the calls accepted within the clock window, so that none is accepted twice.

    Invariant: every nonce whose time is above `floor` is remembered. A nonce is forgotten
    once its time is older than now - skew (the clock check refuses it from then on) or, past
    `capacity`, oldest first; forgetting one raises the floor to its time, and a call signed
    at or before the floor is refused. So a wall clock stepped back, or a flood of signed
    calls, can only narrow what is accepted, never let a call in twice. Not thread-safe: the
    aio server calls it from its one event loop."""

    def __init__(self, skew_s: float, capacity: int) -> None:
        self._skew_s = skew_s
        self._capacity = max(1, capacity)
        self._seen: set[str] = set()
        self._by_time: list[tuple[float, str]] = []  # a heap, oldest first
        self._floor = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, call: SignedCall, now: float) -> None:
        """Record the call's nonce; Unauthenticated if it cannot be told apart from a replay."""
        horizon = now - self._skew_s
        while self._by_time and self._by_time[0][0] < horizon:
            self._forget()
        if call.sent_at <= self._floor:
            # Only after a flood of signed calls (past capacity) or a wall clock stepped back.
            raise Unauthenticated("signature is older than the calls this node can still check for a replay")
        if call.nonce in self._seen:
            raise Unauthenticated("replayed signature (its nonce was used before)")
        self._seen.add(call.nonce)
        heapq.heappush(self._by_time, (call.sent_at, call.nonce))
        while len(self._seen) > self._capacity:
            self._forget()

    def _forget(self) -> None:
        sent_at, nonce = heapq.heappop(self._by_time)
        self._seen.discard(nonce)
        self._floor = max(self._floor, sent_at)


class ClusterKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid cluster-key signature before they reach a servicer, and
    binds the request body of single-request calls to their signature."""

    def __init__(self, cluster_key: str, skew_s: float,
                 on_reject: Callable[[str], None] | None = None, nonce_capacity: int = 100_000,
                 max_request_bytes: int = 4 * 2**20) -> None:
        self._key = cluster_key
        self._max_request_bytes = max_request_bytes
        self._skew_s = skew_s
        self._on_reject = on_reject
        self._replays = ReplayGuard(skew_s, nonce_capacity)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        method: str = handler_call_details.method
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return await continuation(handler_call_details)
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ())
                    if isinstance(v, str)}
        now = time.time()
        try:
            call = verify(self._key, method, metadata, self._skew_s, now)
            self._replays.admit(call, now)
        except Unauthenticated as exc:
            return self._refuse(method, str(exc))
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler  # unknown method (UNIMPLEMENTED), or a stream: headers are all we can check
        if not call.body_sha256:
            return self._refuse(method, "the request body is not signed")
        return _bind_body(handler, call.body_sha256, lambda: self._count(method), self._max_request_bytes)

    def _count(self, method: str) -> None:
        if self._on_reject is not None:
            self._on_reject(method)

    def _refuse(self, method: str, reason: str) -> Any:
        self._count(method)
        return _refusal(reason)


def _refusal(reason: str) -> Any:
    """Ends any call UNAUTHENTICATED without reading its request: a request-streaming handler
    is started with an iterator it never touches, whatever shape the method has (on the wire a
    refusal is the same status either way), so no message is received or buffered."""

    async def abort(_requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"cluster key check failed: {reason}")

    return grpc.stream_unary_rpc_method_handler(abort)


@dataclass(frozen=True)
class _Unusable:
    """What the checking deserializer hands the servicer wrapper instead of a request it must
    not see: bytes that do not hash to the signed digest, or bytes that are no message of the
    method's type. (A deserializer that raises ends the call UNKNOWN, with a logged
    traceback, and cannot choose the status.)"""

    code: grpc.StatusCode
    message: str
    auth_failure: bool  # counted as a failed cluster-key check


_MISMATCH = _Unusable(grpc.StatusCode.UNAUTHENTICATED,
                      "cluster key check failed: request body does not match its signature", True)


def _bind_body(handler: Any, digest: str, count: Callable[[], None], max_bytes: int) -> Any:
    """The handler of a single-request method with its request bytes checked against the
    signed digest, and their size against `max_bytes`, before they are parsed."""
    parse = handler.request_deserializer

    def checked(raw: bytes) -> Any:
        if not hmac.compare_digest(body_digest(raw).encode(), digest.encode()):
            return _MISMATCH
        if len(raw) > max_bytes:
            # Only Forward carries bulk (hidden states); a single-message request this large is
            # a mistake or an attack, and parsing it costs several times its size.
            return _Unusable(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"a request of {len(raw)} bytes is over this node's limit of {max_bytes}", False)
        if parse is None:
            return raw
        try:
            return parse(raw)
        except DecodeError as exc:  # signed by a key holder, but not a message: its own mistake
            return _Unusable(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {exc}",
                             False)

    async def refuse(context: grpc.aio.ServicerContext[Any, Any], unusable: _Unusable) -> None:
        if unusable.auth_failure:
            count()
        await context.abort(unusable.code, unusable.message)

    if handler.response_streaming:
        behaviour = handler.unary_stream
        if inspect.isasyncgenfunction(behaviour):
            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                if isinstance(request, _Unusable):
                    await refuse(context, request)
                replies = behaviour(request, context)
                try:
                    async for reply in replies:
                        yield reply
                finally:  # a caller that went away closes this generator: the servicer's cleanup runs now
                    await replies.aclose()

            wrapped: Callable[..., Any] = stream
        else:  # the reader/writer style: a coroutine that writes to the context
            async def stream_by_writes(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                if isinstance(request, _Unusable):
                    await refuse(context, request)
                await behaviour(request, context)

            wrapped = stream_by_writes
        return grpc.unary_stream_rpc_method_handler(wrapped, request_deserializer=checked,
                                                    response_serializer=handler.response_serializer)

    unary = handler.unary_unary

    async def single(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Unusable):
            await refuse(context, request)
        reply = unary(request, context)
        return await reply if inspect.isawaitable(reply) else reply

    return grpc.unary_unary_rpc_method_handler(single, request_deserializer=checked,
                                               response_serializer=handler.response_serializer)
