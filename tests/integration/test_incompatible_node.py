"""A device running another EdgeMesh release: shown as `incompatible` with the reason, never
planned onto, and judged again when it comes back with a matching version.

The other release is a real mDNS record (the real Advertiser, on loopback) that says protocol
version 1; it points at a real node's gRPC port, so if the gateway ignored the version it would
happily follow that node and plan onto it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh import PROTOCOL_VERSION
from mesh.discovery import Advertisement, Advertiser
from mesh.transport.auth import cluster_hash
from mesh.types import NodeId
from tests.conftest import Launcher, gateway_url
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

pytestmark = pytest.mark.slow


@contextmanager
def advertised(ad: Advertisement) -> Iterator[None]:
    """Publish one mDNS record from a loop of its own until the block ends (then say goodbye)."""
    started, stop = threading.Event(), threading.Event()
    failure: list[Exception] = []

    async def publish() -> None:
        advertiser = Advertiser(ad, "127.0.0.1")
        await advertiser.start()
        started.set()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.05)
        finally:
            await advertiser.stop()

    def run() -> None:
        try:
            asyncio.run(publish())
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which fails with it
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30) and not failure, failure
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def wait_node(url: str, address: str, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/api/cluster", timeout=10).json()
        seen = next((n for n in view["nodes"] if n["address"] == address), {})
        if seen and predicate(seen):
            return view
        time.sleep(0.2)
    raise AssertionError(f"node at {address} not as expected within {timeout}s: {seen}")


def test_a_node_of_another_protocol_version_is_shown_incompatible(launcher: Launcher, tmp_path: Path) -> None:
    # A real node that does not advertise itself: the only records of it are the test's. The
    # tiny model: what is checked is who gets work, not what the answer says.
    model = write_tiny_gguf(tmp_path / "tiny.gguf", SPECS[0])
    node = launcher.node("desk", model, "--no-advertise")
    gateway = launcher.gateway("gw", model)
    url = gateway_url(gateway)
    grpc_port, node_id = int(node.ready[1]), NodeId(node.ready[3])
    address = f"127.0.0.1:{grpc_port}"
    record = {"node_id": node_id, "name": "desk", "cluster_hash": cluster_hash(launcher.cluster_key),
              "grpc_port": grpc_port, "metrics_port": int(node.ready[2])}
    # What an older release of EdgeMesh on that device would publish.
    with advertised(Advertisement(**record, protocol_version=PROTOCOL_VERSION - 1)):
        view = wait_node(url, address, lambda n: n["state"] == "incompatible")
        shown = next(n for n in view["nodes"] if n["address"] == address)
        assert f"protocol version {PROTOCOL_VERSION - 1}" in shown["reason"], shown
        assert f"speaks {PROTOCOL_VERSION}" in shown["reason"], shown
        # Never planned onto, though the node behind the record would load the model at once.
        time.sleep(3)
        view = httpx.get(f"{url}/api/cluster", timeout=10).json()
        assert view["placements"] == [], view["placements"]
        assert next(n for n in view["nodes"] if n["address"] == address)["state"] == "incompatible"
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
        assert refused.status_code == 503, refused.text

    # The device is upgraded: its record now carries our version, and the gateway follows it.
    with advertised(Advertisement(**record)):
        wait_node(url, address, lambda n: n["state"] == "ready", timeout=60)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=120)
        assert answer.status_code == 200, answer.text
