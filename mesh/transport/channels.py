"""Client side of the wire: channels with keepalive and size limits, and NodeClient, the
only way the mesh calls a node. Every call it makes is signed and has a deadline."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.config import Limits, Timeouts
from mesh.errors import CapacityExhausted, EdgeMeshError, InvalidInput, NotFound, PeerError, Unauthenticated
from mesh.transport import auth, convert
from mesh.transport.generated import edgemesh_pb2_grpc as pb_grpc
from mesh.types import GenerationRequest, NodeInfo, TokenEvent

log = logging.getLogger(__name__)

SERVICE = "/edgemesh.v1.Node/"


def channel_options(timeouts: Timeouts, limits: Limits) -> list[tuple[str, int]]:
    """Client keepalive is off in gRPC by default; we turn it on so a dead peer is noticed
    even while a stream is silent."""
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.keepalive_time_ms", int(timeouts.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeouts.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # retries are the scheduler's decision, per call
    ]


def error_from_rpc(exc: grpc.aio.AioRpcError, what: str) -> EdgeMeshError:
    """Map a failed call to our error hierarchy; only transport-level failures are retryable."""
    code = exc.code()
    detail = exc.details() or code.name
    message = f"{what}: {detail}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(message)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CapacityExhausted(message)
    retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.INTERNAL)
    return PeerError(message, retryable=retryable, code=code.name)


class NodeClient:
    """A connection to one node."""

    def __init__(self, address: str, cluster_key: str, timeouts: Timeouts, limits: Limits) -> None:
        self.address = address
        self._key = cluster_key
        self._timeouts = timeouts
        self._channel = grpc.aio.insecure_channel(address, options=channel_options(timeouts, limits))
        self._stub = pb_grpc.NodeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _meta(self, method: str) -> tuple[tuple[str, str], ...]:
        return auth.sign(self._key, SERVICE + method)

    async def info(self) -> NodeInfo:
        try:
            msg = await self._stub.Info(convert.info_request(), timeout=self._timeouts.info_rpc_s,
                                        metadata=self._meta("Info"))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"Info on {self.address}") from exc
        return convert.node_info_from_pb(msg)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream tokens. The whole call has the request deadline, the first token its own
        deadline and every later token the idle deadline, so a stalled node is noticed."""
        import asyncio

        call = self._stub.Generate(convert.generate_request_to_pb(request), timeout=self._timeouts.request_s,
                                   metadata=self._meta("Generate"))
        first = True
        try:
            while True:
                wait = self._timeouts.first_token_s if first else self._timeouts.token_idle_s
                try:
                    msg = await asyncio.wait_for(call.read(), timeout=wait)
                except asyncio.TimeoutError:
                    call.cancel()
                    raise PeerError(f"Generate on {self.address}: no token for {wait:.0f}s") from None
                if msg is grpc.aio.EOF:
                    return
                first = False
                yield convert.token_event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"Generate on {self.address}") from exc
        finally:
            call.cancel()  # no-op after a clean end; frees the node's slot when the consumer stops early

    async def health_watch(self) -> AsyncIterator[bool]:
        """Yields True/False as the node's health status changes; ends when the stream breaks."""
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=""),
                                  timeout=self._timeouts.request_s)
        try:
            async for msg in call:
                yield msg.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"health watch on {self.address}") from exc
        finally:
            call.cancel()

    @property
    def stub(self) -> Any:
        """The raw stub, for the pipeline driver (stage RPCs); callers must sign with `metadata`."""
        return self._stub

    def metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        return self._meta(method)

    async def close(self) -> None:
        await self._channel.close(grace=None)
