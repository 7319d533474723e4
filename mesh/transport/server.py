"""Server side of the wire: an aio gRPC server with auth, size limits, keepalive policy
and the standard health service."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh.config import Limits, Timeouts
from mesh.transport.auth import ClusterKeyInterceptor
from mesh.transport.channels import shared_options
from mesh.transport.tls import ClusterCredentials


def server_options(timeouts: Timeouts, limits: Limits) -> list[tuple[str, int]]:
    """Accept the keepalive pings our clients send; gRPC's server default would answer
    them with GOAWAY (too_many_pings) and drop healthy connections.

    The receive window is fixed: with gRPC's bandwidth-delay probing a sender's window grows
    to megabytes per connection, and that is what an unsigned caller gets buffered in the
    node before its refusal lands (six unsigned 60 MB calls still added 20-60 MB resident,
    with the refusal already made from the headers alone). 1 MiB per stream is 1 GB/s at a
    1 ms round trip, more than a LAN carries."""
    return [
        *shared_options(timeouts, limits),
        ("grpc.http2.min_ping_interval_without_data_ms", int(timeouts.keepalive_time_s * 500)),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),  # two nodes must never share a port by accident
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", limits.grpc_window_bytes),
    ]


class HealthState:
    """The node's grpc.health.v1 status."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        result = self.servicer.set("", status)
        if result is not None:
            await result


def make_server(cluster_key: str, timeouts: Timeouts, limits: Limits, health_state: HealthState,
                on_reject: Callable[[str], None] | None = None) -> grpc.aio.Server:
    server = grpc.aio.server(
        interceptors=[ClusterKeyInterceptor(cluster_key, timeouts.auth_skew_s, on_reject, limits.auth_nonces,
                                                  limits.max_request_bytes)],
        options=server_options(timeouts, limits),
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_state.servicer, server)
    return server


def bind(server: grpc.aio.Server, host: str, port: int, credentials: ClusterCredentials | None) -> int:
    """Bind and return the port actually bound (port 0 picks a free one). With credentials
    (always, but under --insecure-plaintext) the port speaks only mutual TLS under the
    cluster CA: a caller without a certificate of this cluster gets no further than the
    handshake."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        bound = int(server.add_insecure_port(address))
    else:
        bound = int(server.add_secure_port(address, credentials.grpc_server()))
    if bound == 0:
        raise OSError(f"cannot bind gRPC on {address}")
    return bound
