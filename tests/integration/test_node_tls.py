"""A node speaks only mutual TLS under its cluster's CA, on gRPC and on the step socket
(issue 17): a plain-text client, a client of another cluster key, a client without a
certificate and a caller that expected another node all fail, while a member gets through
on TLS 1.3. One real node process; the callers are this test process."""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.config import Limits, Timeouts
from mesh.errors import Unauthenticated
from mesh.transport import step_socket as wire
from mesh.transport import tls
from mesh.transport.channels import NodeClient
from tests.conftest import Launcher
from tests.fixtures.node_wire import node_channel, step_socket
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real GGUF: these checks are of the node's sockets, not of its output."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", SPECS[0])


async def _health(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _client(pair: tls.ClusterCredentials, trust: bytes, *, newest: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A TLS client that trusts `trust` and presents `pair`, optionally capped at a TLS version."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=trust.decode())
    if newest is not None:
        context.maximum_version = newest
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert.write_bytes(pair.cert_pem)
        key.write_bytes(pair.key_pem)
        context.load_cert_chain(cert, key)
    return context


def test_a_node_accepts_only_members_of_its_cluster_over_tls13(launcher: Launcher, tiny_model: Path) -> None:
    node = launcher.node("tls-node", tiny_model, "--role", "stage")
    address, node_id = f"127.0.0.1:{node.ready[1]}", node.ready[3]
    key = launcher.cluster_key
    member = tls.credentials_for(key)
    assert member is not None and not member.is_node
    outsider = tls.ClusterCredentials.mint("another mesh's key", "client-outsider", node=False)

    async def grpc_calls() -> None:
        right = NodeClient(address, key, Timeouts(), Limits(), node_id=node_id)
        assert (await right.info()).node_id == node_id
        await right.close()

        async with grpc.aio.insecure_channel(address) as plain:  # what llama.cpp's RPC mode would be
            assert await _health(plain) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(address, outsider.grpc_channel,
                                           options=[("grpc.ssl_target_name_override", tls.NODE_NAME)]) as other:
            assert await _health(other) == grpc.StatusCode.UNAVAILABLE
        # Trusting the right CA but with no certificate of its own: the node wants one.
        anonymous = grpc.ssl_channel_credentials(root_certificates=member.ca_pem)
        async with grpc.aio.secure_channel(address, anonymous,
                                           options=[("grpc.ssl_target_name_override", tls.NODE_NAME)]) as anon:
            assert await _health(anon) == grpc.StatusCode.UNAVAILABLE
        async with node_channel(address, key) as ours:  # the control: a member's raw channel works
            assert await _health(ours) == grpc.StatusCode.OK

        # NodeClient says why: another cluster's key, or a node other than the one expected.
        for client in (NodeClient(address, "another mesh's key", Timeouts(), Limits()),
                       NodeClient(address, key, Timeouts(), Limits(), node_id="ffffffffffffffff")):
            with pytest.raises(Unauthenticated, match="failed to connect"):
                await client.info()
            await client.close()

    asyncio.run(grpc_calls())

    # The gRPC port negotiates TLS 1.3 with a member, and its certificate names the node.
    context = _client(member, member.ca_pem)  # its own: the process's shared context stays as it is
    context.check_hostname = True  # the certificate must name the node id given below
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", int(node.ready[1])), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=node_id) as conn:
        assert conn.version() == "TLSv1.3"
        names = [value for kind, value in conn.getpeercert()["subjectAltName"]]
        assert names == [node_id, tls.NODE_NAME]

    # The step socket: a member gets the cluster-key handshake's HELLO only inside TLS 1.3 ...
    step_port = _step_port(address, key)
    with step_socket(step_port, key, timeout=10) as conn:
        assert isinstance(conn, ssl.SSLSocket) and conn.version() == "TLSv1.3"
        assert wire.read_frame(conn, 4096, time.monotonic() + 10).kind == wire.HELLO
    # ... a plain-text peer gets not a byte of it (the node waits for a ClientHello) ...
    with socket.create_connection(("127.0.0.1", step_port), timeout=10) as bare:
        bare.sendall(wire._HEADER.pack(1, wire.HELLO) + b"\x01")
        bare.settimeout(Timeouts().connect_s + 3)
        try:
            got = bare.recv(4096)
        except ConnectionResetError:
            got = b""
        assert not got.startswith(wire._HEADER.pack(1 + wire.NONCE_BYTES, wire.HELLO)), got
    # ... and a TLS client of another cluster, or a member ready only for TLS 1.2, fails the handshake.
    for context in (_client(outsider, outsider.ca_pem), _client(member, member.ca_pem, newest=ssl.TLSVersion.TLSv1_2)):
        with socket.create_connection(("127.0.0.1", step_port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                with context.wrap_socket(raw, server_hostname=node_id) as conn:
                    conn.recv(1)  # TLS 1.3 checks the client's certificate after the client's Finished
    # Through all of it the node went on serving.
    assert node.popen.poll() is None
    assert "Traceback" not in node.log()


def _step_port(address: str, key: str) -> int:
    async def ask() -> int:
        client = NodeClient(address, key, Timeouts(), Limits())
        try:
            return (await client.info()).step_port
        finally:
            await client.close()

    return asyncio.run(ask())


def test_plaintext_is_refused_off_loopback(launcher: Launcher, tiny_model: Path) -> None:
    node = launcher.start("plain-lan", ["node", "--model", str(tiny_model), "--host", "0.0.0.0", "--port", "0",
                                        "--metrics-port", "0", "--step-port", "0", "--insecure-plaintext"],
                          wait_ready=False)
    assert node.popen.wait(timeout=60) != 0
    assert "--insecure-plaintext is only for debugging on loopback" in node.log()
    assert "Traceback" not in node.log()
