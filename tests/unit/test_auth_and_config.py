"""Cluster-key signatures, configuration parsing and secure-default checks."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mesh.cli import build_parser
from mesh.config import (
    BenchConfig,
    GatewayConfig,
    Limits,
    NodeConfig,
    RayUpConfig,
    Timeouts,
    UpConfig,
    is_loopback,
    parse_bytes,
    resolve_cluster_key,
)
from mesh.errors import ConfigError, EdgeMeshError, Unauthenticated
from mesh.gateway.runtime import check_bind_is_safe
from mesh.ready_file import GatewayReady, NodeReady, read_gateway_ready, read_node_ready, read_ready, write_ready
from mesh.settings import ENV_PREFIX, add_arguments, as_flags, from_arguments, shared
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
from mesh.types import NodeId

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


# Every command that runs a gateway or nodes, with the config object its flags build.
TUNED_COMMANDS: list[tuple[list[str], type[Any]]] = [
    (["node"], NodeConfig), (["gateway"], GatewayConfig), (["up"], UpConfig), (["bench"], BenchConfig),
    (["ray", "up"], RayUpConfig)]
TUNED_FIELDS = [(cls, f) for cls in (Timeouts, Limits) for f in dataclasses.fields(cls)]


def _other(value: float, step: int) -> float:
    """A value of the same type as `value` that is neither it nor another step's."""
    return type(value)(value + step) if isinstance(value, int) else value + step / 4


def _tuned(config: Any) -> dict[str, float]:
    return {f.name: getattr(getattr(config, "timeouts" if cls is Timeouts else "limits"), f.name)
            for cls, f in TUNED_FIELDS}


@pytest.fixture
def _no_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    for _cls, f in TUNED_FIELDS:
        monkeypatch.delenv(ENV_PREFIX + f.name.upper(), raising=False)


@pytest.mark.parametrize(("command", "cls"), TUNED_COMMANDS, ids=lambda c: " ".join(c) if isinstance(c, list) else "")
def test_every_timeout_and_limit_is_a_flag_and_a_variable_of_every_command_that_uses_it(
        command: list[str], cls: type[Any], monkeypatch: pytest.MonkeyPatch, _no_tuning: None) -> None:
    defaults = {f.name: f.default for _c, f in TUNED_FIELDS}
    assert _tuned(from_arguments(cls, build_parser().parse_args(command))) == defaults
    from_env = {name: _other(value, 1) for name, value in defaults.items()}
    for name, value in from_env.items():
        monkeypatch.setenv(ENV_PREFIX + name.upper(), str(value))
    assert _tuned(from_arguments(cls, build_parser().parse_args(command))) == from_env
    # A flag wins over the environment, field by field: half of them given as flags.
    from_flags = {name: _other(value, 2) for i, (name, value) in enumerate(defaults.items()) if i % 2}
    argv = [arg for name, value in from_flags.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    assert _tuned(from_arguments(cls, build_parser().parse_args([*command, *argv]))) == {**from_env, **from_flags}


@pytest.mark.parametrize("bad", ["abc", "0", "-1", "nan", "inf", ""])
def test_a_bad_timeout_or_limit_is_refused_naming_its_flag_or_variable(
        bad: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], _no_tuning: None) -> None:
    for flag in ("--first-token-s", "--max-body-bytes"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["gateway", flag, bad])
        assert exited.value.code == 2 and f"argument {flag}: must be a positive" in capsys.readouterr().err
    monkeypatch.setenv("EDGEMESH_FIRST_TOKEN_S", bad)
    monkeypatch.setenv("EDGEMESH_MAX_BODY_BYTES", bad)
    args = build_parser().parse_args(["up"])
    with pytest.raises(ConfigError, match=r"EDGEMESH_FIRST_TOKEN_S=.* is not a (positive )?number "
                                          r"\(it sets --first-token-s"):
        from_arguments(UpConfig, args)
    # A flag given outright wins over the bad variable, and the other one is still refused.
    args = build_parser().parse_args(["node", "--first-token-s", "3"])
    with pytest.raises(ConfigError, match=r"EDGEMESH_MAX_BODY_BYTES=.* whole number .*--max-body-bytes"):
        from_arguments(NodeConfig, args)
    args = build_parser().parse_args(["node", "--first-token-s", "3", "--max-body-bytes", "9"])
    config = from_arguments(NodeConfig, args)
    assert (config.timeouts.first_token_s, config.limits.max_body_bytes) == (3.0, 9)
    # A command that uses no timeout does not care.
    assert build_parser().parse_args(["status"]).url


def test_a_launcher_passes_its_timeouts_and_limits_on_to_its_gateway_and_nodes(_no_tuning: None) -> None:
    up = from_arguments(UpConfig, build_parser().parse_args(
        ["up", "--first-token-s", "7.5", "--http-body-s", "2", "--max-body-bytes", "1000", "--api-key", "k"]))
    gateway = GatewayConfig(**shared(up, GatewayConfig))
    assert gateway.timeouts == up.timeouts and gateway.limits == up.limits and gateway.api_key == "k"
    # What `up` adds to each node's command line (only what differs from the defaults) gives the node the same.
    argv = as_flags(up.timeouts) + as_flags(up.limits)
    assert argv == ["--first-token-s", "7.5", "--http-body-s", "2.0", "--max-body-bytes", "1000"]
    node = from_arguments(NodeConfig, build_parser().parse_args(["node", *argv]))
    assert node.timeouts == up.timeouts and node.limits == up.limits
    # `ray up` hands its own to each actor's NodeConfig the same way; bench to its local mesh.
    ray = from_arguments(RayUpConfig, build_parser().parse_args(["ray", "up", *argv]))
    assert (ray.timeouts, ray.limits) == (up.timeouts, up.limits)
    bench = from_arguments(BenchConfig, build_parser().parse_args(["bench", *argv]))
    assert UpConfig(**shared(bench, UpConfig)).timeouts == up.timeouts


def test_launcher_settings_that_mean_the_gateways_are_declared_once() -> None:
    gateway = {f.name: f for f in dataclasses.fields(GatewayConfig)}
    for cls in (UpConfig, RayUpConfig):
        for name in ("host", "port", "api_key", "policy", "cloud_url", "cloud_model", "cloud_key_env"):
            mine = next(f for f in dataclasses.fields(cls) if f.name == name)
            assert (mine.default, mine.metadata) == (gateway[name].default, gateway[name].metadata), (cls, name)
    up = build_parser().parse_args(["up", "--allow-model", "AB" * 32, "--deny-pattern", "x", "--stages", "2"])
    config = from_arguments(UpConfig, up)
    assert (config.allowed_models, config.deny_pattern, config.stages) == (("ab" * 32,), ("x",), 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--strategy", "sideways"])


def test_the_cli_and_ray_commands_import_each_other_in_no_cycle() -> None:
    import subprocess
    import sys

    code = ("import sys; import mesh.ray.commands; assert 'mesh.cli' not in sys.modules, 'cycle'; "
            "import mesh.cli; mesh.cli.build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_ready_files_are_written_whole_and_read_back(tmp_path: Path) -> None:
    node, gateway = tmp_path / "node.ready", tmp_path / "gateway.ready"
    assert read_node_ready(node) is None and read_gateway_ready(gateway) is None  # not yet written
    write_ready(node, NodeReady("127.0.0.1", 7471, 9471, NodeId("0123456789abcdef")))
    write_ready(gateway, GatewayReady("127.0.0.1", 8080))
    assert node.read_text() == "127.0.0.1 7471 9471 0123456789abcdef\n"
    assert gateway.read_text() == "127.0.0.1 8080\n"
    ready = read_node_ready(node)
    assert ready == NodeReady("127.0.0.1", 7471, 9471, NodeId("0123456789abcdef"))
    assert ready.address == "127.0.0.1:7471"
    assert read_gateway_ready(gateway) == GatewayReady("127.0.0.1", 8080)
    assert read_ready(node) == ready and read_ready(gateway) == GatewayReady("127.0.0.1", 8080)
    assert read_ready(tmp_path / "none") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.ready", "node.ready"]  # nothing left aside
    with pytest.raises(ConfigError, match="expected 4 fields"):
        read_node_ready(gateway)
    gateway.write_text("127.0.0.1 http\n")
    with pytest.raises(ConfigError, match="'http' is not a port"):
        read_gateway_ready(gateway)


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


def test_a_node_of_up_takes_ups_flag_over_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """`up --connect-s 5` with EDGEMESH_CONNECT_S=1 exported: the flag is at its default, so up
    passes no flag for it; the node must then not read the 1 s from its environment, or the
    nodes and the gateway would disagree."""
    from mesh.local_mesh import node_environment

    monkeypatch.setenv(f"{ENV_PREFIX}CONNECT_S", "1")
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_BODY_BYTES", "77")
    up = from_arguments(UpConfig, build_parser().parse_args(["up", "--connect-s", "5"]))
    assert up.timeouts.connect_s == 5.0 and up.limits.max_body_bytes == 77
    env = node_environment(dict(os.environ), "key", stages=False)
    assert f"{ENV_PREFIX}CONNECT_S" not in env and env["EDGEMESH_CLUSTER_KEY"] == "key"
    monkeypatch.delenv(f"{ENV_PREFIX}CONNECT_S")
    monkeypatch.delenv(f"{ENV_PREFIX}MAX_BODY_BYTES")
    node = from_arguments(NodeConfig, build_parser().parse_args(
        ["node", *as_flags(up.timeouts), *as_flags(up.limits)]))
    assert (node.timeouts, node.limits) == (up.timeouts, up.limits)


def test_up_makes_its_own_key_whatever_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGEMESH_CLUSTER_KEY is a real mesh's key (the nodes read it): `up` under it would take
    that mesh's nodes, found by mDNS, for its own. Only --cluster-key gives `up` a key."""
    monkeypatch.setenv("EDGEMESH_CLUSTER_KEY", "the-office-mesh-key-0123456789")
    assert from_arguments(UpConfig, build_parser().parse_args(["up"])).cluster_key == ""
    assert from_arguments(RayUpConfig, build_parser().parse_args(["ray", "up"])).cluster_key == ""
    given = from_arguments(UpConfig, build_parser().parse_args(["up", "--cluster-key", "k" * 24]))
    assert given.cluster_key == "k" * 24
    assert from_arguments(NodeConfig, build_parser().parse_args(["node"])).cluster_key.startswith("the-office")
