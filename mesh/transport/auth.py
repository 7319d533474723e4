"""Cluster-key authentication of node RPCs.

Every call carries the time it was made and an HMAC-SHA256 of (time, method) under the
cluster key. A node refuses a call whose signature is missing, wrong, or whose time is
further than the allowed skew from its own clock (UNAUTHENTICATED). The mDNS record
carries only `cluster_hash`, a keyed digest that lets meshes on one LAN ignore each
other without revealing the key.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

TS_HEADER = "x-edgemesh-ts"
SIG_HEADER = "x-edgemesh-sig"

# The standard health service stays open: it reveals nothing and orchestrators probe it.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


def cluster_hash(cluster_key: str) -> str:
    """Short public id of a cluster, safe to put in an mDNS TXT record."""
    return hmac.new(cluster_key.encode(), b"edgemesh cluster id", hashlib.sha256).hexdigest()[:12]


def node_proof(cluster_key: str, challenge: bytes, node_id: str) -> str:
    """A node's answer to a caller's challenge: only a holder of the cluster key can make it,
    so an impostor that copied an mDNS record (whose cluster hash is public) is refused."""
    return hmac.new(cluster_key.encode(), b"edgemesh node proof\n" + challenge + node_id.encode(),
                    hashlib.sha256).hexdigest()


def _signature(cluster_key: str, timestamp: str, method: str) -> str:
    message = f"{timestamp}\n{method}".encode()
    return hmac.new(cluster_key.encode(), message, hashlib.sha256).hexdigest()


def sign(cluster_key: str, method: str, now: float | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata to attach to a call of `method` (full name, e.g. /edgemesh.v1.Node/Info)."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    return ((TS_HEADER, timestamp), (SIG_HEADER, _signature(cluster_key, timestamp, method)))


def verify(cluster_key: str, method: str, metadata: dict[str, str], skew_s: float,
           now: float | None = None) -> str | None:
    """None when the call is authentic, else the reason it is not."""
    timestamp = metadata.get(TS_HEADER)
    signature = metadata.get(SIG_HEADER)
    if not timestamp or not signature:
        return "missing cluster-key signature"
    try:
        sent = float(timestamp)
    except ValueError:
        return "malformed signature timestamp"
    current = time.time() if now is None else now
    if abs(current - sent) > skew_s:
        return f"signature time is {current - sent:+.0f}s off this node's clock (limit {skew_s:.0f}s)"
    if not hmac.compare_digest(signature, _signature(cluster_key, timestamp, method)):
        return "wrong cluster key"
    return None


class ClusterKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls without a valid cluster-key signature before they reach a servicer."""

    def __init__(self, cluster_key: str, skew_s: float,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self._key = cluster_key
        self._skew_s = skew_s
        self._on_reject = on_reject

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
        reason = verify(self._key, method, metadata, self._skew_s)
        if reason is None:
            return await continuation(handler_call_details)
        if self._on_reject is not None:
            self._on_reject(method)
        return _reject_handler(await continuation(handler_call_details), reason)


def _reject_handler(handler: Any, reason: str) -> Any:
    """A handler of the same streaming shape as the real one that aborts UNAUTHENTICATED."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"cluster key check failed: {reason}")

    async def abort_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"cluster key check failed: {reason}")
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort)
