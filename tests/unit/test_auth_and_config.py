"""Cluster-key signatures, configuration parsing and secure-default checks."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

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
from mesh.errors import ConfigError
from mesh.gateway.runtime import check_bind_is_safe
from mesh.transport.auth import cluster_hash, sign, verify

METHOD = "/edgemesh.v1.Node/Info"


def test_signature_round_trip_and_every_way_it_fails() -> None:
    meta = dict(sign("k1", METHOD, now=1000.0))
    assert verify("k1", METHOD, meta, skew_s=60, now=1010.0) is None
    assert verify("k2", METHOD, meta, skew_s=60, now=1010.0) == "wrong cluster key"
    assert verify("k1", "/edgemesh.v1.Node/Generate", meta, skew_s=60, now=1010.0) == "wrong cluster key"
    assert "off this node's clock" in (verify("k1", METHOD, meta, skew_s=60, now=1100.0) or "")
    assert verify("k1", METHOD, {}, skew_s=60) == "missing cluster-key signature"
    assert verify("k1", METHOD, {**meta, "x-edgemesh-ts": "soon"}, skew_s=60) == "malformed signature timestamp"


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
