"""Cluster-key signatures, configuration parsing and secure-default checks."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mesh.config import (
    GatewayConfig,
    NodeConfig,
    add_arguments,
    from_arguments,
    is_loopback,
    parse_bytes,
    resolve_cluster_key,
)
from mesh.errors import ConfigError, EdgeMeshError, Unauthenticated
from mesh.gateway.runtime import check_bind_is_safe
from mesh.transport.auth import (
    BODY_HEADER,
    NONCE_HEADER,
    SIG_HEADER,
    TS_HEADER,
    ReplayGuard,
    SignedCall,
    _signature,
    body_digest,
    cluster_hash,
    sign,
    verify,
)
from mesh.transport.generated.edgemesh_pb2 import InfoRequest

METHOD = "/edgemesh.v1.Node/Info"


def refusal(key: str, method: str, meta: dict[str, str], now: float | None = 1010.0) -> str:
    """Why verify refuses these headers ('' when it accepts them)."""
    try:
        verify(key, method, meta, skew_s=60, now=now)
    except Unauthenticated as exc:
        return str(exc)
    return ""


def test_signature_round_trip_and_every_way_it_fails() -> None:
    meta = dict(sign("k1", METHOD, b"body", now=1000.0))
    call = verify("k1", METHOD, meta, skew_s=60, now=1010.0)
    assert call.sent_at == 1000.0 and call.body_sha256 == body_digest(b"body") and len(call.nonce) == 32
    assert refusal("k2", METHOD, meta) == "wrong cluster key"
    assert refusal("k1", "/edgemesh.v1.Node/Generate", meta) == "wrong cluster key"
    assert "off this node's clock" in refusal("k1", METHOD, meta, now=1100.0)
    assert "off this node's clock" in refusal("k1", METHOD, meta, now=900.0)
    assert refusal("k1", METHOD, {}) == "missing cluster-key signature"
    assert refusal("k1", METHOD, {**meta, TS_HEADER: "soon"}) == "malformed signature timestamp"
    # Every signed field is covered: another body digest, nonce or time is a wrong signature.
    assert refusal("k1", METHOD, {**meta, BODY_HEADER: body_digest(b"other")}) == "wrong cluster key"
    assert refusal("k1", METHOD, {**meta, NONCE_HEADER: "0" * 32}) == "wrong cluster key"
    assert refusal("k1", METHOD, {**meta, TS_HEADER: "1000.001"}) == "wrong cluster key"
    assert refusal("k1", METHOD, {k: v for k, v in meta.items() if k != BODY_HEADER}) == "wrong cluster key"
    assert refusal("k1", METHOD, {**meta, NONCE_HEADER: "not hex"}) == "malformed cluster-key signature"
    assert refusal("k1", METHOD, {**meta, SIG_HEADER: "é" * 64}) == "malformed cluster-key signature"
    # A request-streaming call signs no body; a message signs its serialized bytes.
    assert verify("k1", METHOD, dict(sign("k1", METHOD)), skew_s=60).body_sha256 == ""
    request = InfoRequest(challenge=b"c" * 16)
    assert dict(sign("k1", METHOD, request))[BODY_HEADER] == body_digest(request.SerializeToString())
    assert dict(sign("k1", METHOD))[NONCE_HEADER] != dict(sign("k1", METHOD))[NONCE_HEADER]


@pytest.mark.parametrize("timestamp", ["nan", "NaN", "inf", "-inf", "infinity", "1e3", "1_000.0", " 1000",
                                       "-1000", "1000.", "0x3e8", "\u0661\u0660\u0660\u0660"])
def test_a_timestamp_that_is_not_plain_decimal_seconds_is_refused(timestamp: str) -> None:
    # Signed with the key, so only the time itself is wrong: abs(now - nan) > skew is False,
    # which let "nan" through the clock check for good.
    meta = {TS_HEADER: timestamp, NONCE_HEADER: "a" * 32,
            SIG_HEADER: _signature("k1", timestamp, "a" * 32, "", METHOD)}
    assert refusal("k1", METHOD, meta, now=None) == "malformed signature timestamp"


def signed_call(sent_at: float, nonce: str) -> SignedCall:
    return SignedCall(sent_at=sent_at, nonce=nonce, body_sha256="")


def test_replay_guard_refuses_a_nonce_twice_and_forgets_it_once_the_clock_would() -> None:
    guard = ReplayGuard(skew_s=60, capacity=1000)
    guard.admit(signed_call(1000.0, "a"), now=1000.0)
    guard.admit(signed_call(1000.0, "b"), now=1001.0)
    with pytest.raises(Unauthenticated, match="replayed"):
        guard.admit(signed_call(1000.0, "a"), now=1030.0)
    assert len(guard) == 2
    guard.admit(signed_call(1100.0, "c"), now=1100.0)  # 1000 is outside the window now: forgotten
    assert len(guard) == 1
    # The wall clock stepped back: a forgotten nonce would pass the clock check again, but
    # everything signed at or before a forgotten nonce is refused.
    with pytest.raises(Unauthenticated, match="older than the calls"):
        guard.admit(signed_call(1000.0, "a"), now=1020.0)


def test_replay_guard_stays_bounded_and_never_accepts_twice_when_full() -> None:
    guard = ReplayGuard(skew_s=60, capacity=3)
    for i in range(5):
        guard.admit(signed_call(1000.0 + i, f"n{i}"), now=1005.0)
    assert len(guard) == 3
    for i in range(5):  # the two forgotten ones are refused as too old to check, the rest as replays
        with pytest.raises(Unauthenticated, match="older than the calls" if i < 2 else "replayed"):
            guard.admit(signed_call(1000.0 + i, f"n{i}"), now=1005.0)
    guard.admit(signed_call(1005.0, "fresh"), now=1005.0)  # newer calls still get in


def test_cluster_hash_is_short_stable_and_key_dependent() -> None:
    assert cluster_hash("a") == cluster_hash("a")
    assert cluster_hash("a") != cluster_hash("b")
    assert len(cluster_hash("a")) == 12 and "a" not in cluster_hash("a")[:0]


@pytest.mark.parametrize("text,expected", [("60MB", 60_000_000), ("2GiB", 2 * 2**30), ("0", 0),
                                           ("1.5k", 1500), (" 512 mib ", 512 * 2**20), (7, 7)])
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1MB"])
def test_parse_bytes_rejects_nonsense(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_bytes(text)


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMESH_SLOTS", "3")
    monkeypatch.setenv("EDGEMESH_ADVERTISE", "false")
    parser = argparse.ArgumentParser()
    add_arguments(parser, NodeConfig)
    config = from_arguments(NodeConfig, parser.parse_args(["--port", "0", "--name", "desk"]))
    assert (config.port, config.name, config.slots, config.advertise, config.host) == (0, "desk", 3, False,
                                                                                       "127.0.0.1")
    parser = argparse.ArgumentParser()
    add_arguments(parser, GatewayConfig)
    gw = from_arguments(GatewayConfig, parser.parse_args(["--peer", "a:1", "--peer", "b:2"]))
    assert gw.peer == ("a:1", "b:2") and gw.host == "127.0.0.1"


def test_public_bind_needs_an_api_key() -> None:
    check_bind_is_safe(GatewayConfig(host="127.0.0.1"))
    check_bind_is_safe(GatewayConfig(host="0.0.0.0", api_key="k"))
    with pytest.raises(ConfigError, match="--api-key"):
        check_bind_is_safe(GatewayConfig(host="0.0.0.0"))
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("198.18.0.1")


def test_cluster_key_file_is_created_once_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEMESH_HOME", str(tmp_path))
    first = resolve_cluster_key("")
    assert first == resolve_cluster_key("") and len(first) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "cluster.key").st_mode) == 0o600
    assert resolve_cluster_key("explicit") == "explicit"


def test_the_interceptor_binds_bodies_and_refuses_replays_on_a_real_server() -> None:
    """Every handler shape behind the real interceptor on a real grpc.aio server (bytes in and
    out, so no protobuf): what a servicer sees, and what a caller gets back."""
    import asyncio

    import grpc

    from mesh.transport.auth import ClusterKeyInterceptor

    served: list[bytes] = []
    refused: list[str] = []

    async def unary(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        served.append(request)
        return b"unary:" + request

    async def stream(request: bytes, _context: grpc.aio.ServicerContext) -> Any:
        served.append(request)
        yield b"stream:" + request

    async def writes(request: bytes, context: grpc.aio.ServicerContext) -> None:
        served.append(request)
        await context.write(b"writes:" + request)

    async def chat(requests: Any, _context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            served.append(request)
            yield b"chat:" + request

    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
                "Writes": grpc.unary_stream_rpc_method_handler(writes),
                "Chat": grpc.stream_stream_rpc_method_handler(chat)}

    async def scenario() -> None:
        server = grpc.aio.server(interceptors=[ClusterKeyInterceptor("key", 60, refused.append)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Echo", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                async def call(name: str, body: bytes, meta: Any) -> tuple[grpc.StatusCode, Any]:
                    method = f"/t.Echo/{name}"
                    try:
                        if name == "Unary":
                            return grpc.StatusCode.OK, await channel.unary_unary(method)(body, metadata=meta,
                                                                                          timeout=10)
                        if name == "Chat":
                            replies = channel.stream_stream(method)(iter([body]), metadata=meta, timeout=10)
                        else:
                            replies = channel.unary_stream(method)(body, metadata=meta, timeout=10)
                        return grpc.StatusCode.OK, [reply async for reply in replies]
                    except grpc.aio.AioRpcError as exc:
                        return exc.code(), exc.details()

                for name in ("Unary", "Stream", "Writes"):
                    meta = sign("key", f"/t.Echo/{name}", b"signed")
                    assert (await call(name, b"altered", meta))[0] == grpc.StatusCode.UNAUTHENTICATED
                    expected = b"unary:signed" if name == "Unary" else [f"{name.lower()}:signed".encode()]
                    assert await call(name, b"signed", sign("key", f"/t.Echo/{name}", b"signed")) == \
                        (grpc.StatusCode.OK, expected)
                    code, detail = await call(name, b"signed", meta)  # the altered call used up its nonce
                    assert (code, "replayed" in detail) == (grpc.StatusCode.UNAUTHENTICATED, True)
                    code, detail = await call(name, b"x", sign("key", f"/t.Echo/{name}"))
                    assert (code, detail) == (grpc.StatusCode.UNAUTHENTICATED,
                                              "cluster key check failed: the request body is not signed")
                assert served == [b"signed"] * 3
                code, detail = await call("Unary", b"altered", sign("key", "/t.Echo/Unary", b"signed"))
                assert detail == "cluster key check failed: request body does not match its signature"

                chat_meta = sign("key", "/t.Echo/Chat")
                assert await call("Chat", b"hi", chat_meta) == (grpc.StatusCode.OK, [b"chat:hi"])
                assert (await call("Chat", b"hi", chat_meta))[0] == grpc.StatusCode.UNAUTHENTICATED
                assert (await call("Chat", b"hi", ()))[0] == grpc.StatusCode.UNAUTHENTICATED
                assert (await call("Unary", b"hi", sign("other", "/t.Echo/Unary", b"hi")))[0] == \
                    grpc.StatusCode.UNAUTHENTICATED
                assert (await call("Nothing", b"", sign("key", "/t.Echo/Nothing", b"")))[0] == \
                    grpc.StatusCode.UNIMPLEMENTED
                assert served == [b"signed"] * 3 + [b"hi"]
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    # 3 altered + 3 replays + 3 unsigned bodies + 1 altered + chat replay + unsigned chat + wrong key
    assert len(refused) == 13


def test_a_pipeline_head_keeps_nothing_of_stage_nodes_it_could_not_check() -> None:
    """A caller with the key names the later stages of a RunPipeline; addresses that fail their
    check must not pile up in the head (the fuzzer named thousands)."""
    import socket

    from mesh.config import Limits, Timeouts
    from mesh.errors import PeerError
    from mesh.types import LayerRange, NodeId, PipelineHop
    from node.pipeline_head import PeerLinks

    with socket.socket() as probe:  # a port nothing listens on: the check fails at once
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]

    async def run() -> int:
        links = PeerLinks("key", Timeouts(connect_s=1.0, info_rpc_s=1.0), Limits())
        for i in range(50):
            hop = PipelineHop(NodeId(f"{i:016x}"), f"127.0.0.1:{dead}", LayerRange(0, 1))
            with pytest.raises(PeerError):
                await links.open_link(hop, 1.0)
        bad = PipelineHop(NodeId("f" * 16), "no-port-here", LayerRange(0, 1))
        with pytest.raises(EdgeMeshError):
            await links.open_link(bad, 1.0)
        kept = len(links._checking) + len(links._peers)
        await links.close()
        return kept

    assert asyncio.run(run()) == 0
