"""`edgemesh node --model-from-peers`: a node without the model file gets the bytes of its
layers from a peer, checked by sha256, cached, and reused after a restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.config import Limits, Timeouts
from mesh.transport.channels import NodeClient
from mesh.types import LayerRange
from tests.conftest import Launcher, gateway_url, wait_for_nodes
from tests.fixtures.node_wire import node_channel

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press"


def load(address: str, key: str, sha: str, layers: LayerRange) -> None:
    async def call() -> None:
        client = NodeClient(address, key, Timeouts(), Limits())
        try:
            await client.load_stage(sha, layers, 2048, 1, 120)
        finally:
            await client.close()

    asyncio.run(call())


def test_a_node_without_the_file_serves_a_stage_from_shipped_bytes(
        launcher: Launcher, default_model: Path, tmp_path: Path, reference_llm: Any) -> None:
    from node.gguf import file_sha256

    sha = file_sha256(default_model)
    holder = launcher.node("holder", default_model, "--role", "stage")
    home = tmp_path / "empty-home"  # no model cache: this node has never seen the file
    shard_args = ["node", "--model-from-peers", "--role", "stage", "--name", "shard", "--port", "0",
                  "--metrics-port", "0", "--step-port", "0", "--threads", "1",
                  "--peer", f"127.0.0.1:{holder.ready[1]}"]
    shard = launcher.start("shard", shard_args, env={"EDGEMESH_HOME": str(home)})
    assert not (home / "models").exists()

    load(f"127.0.0.1:{holder.ready[1]}", launcher.cluster_key, sha, LayerRange(0, 15))
    load(f"127.0.0.1:{shard.ready[1]}", launcher.cluster_key, sha, LayerRange(15, 30))
    manifest = json.loads((home / "shards" / f"{sha}.json").read_text())
    present = sum(length for _, length, _ in manifest["ranges"])
    assert 0.3 * default_model.stat().st_size < present < 0.8 * default_model.stat().st_size  # its layers only
    assert "fetched" in shard.log() and "shard of" in shard.log()  # progress was shown

    # --no-placement: this test loads the stages itself (the controller would rather give each
    # node a whole one-stage pipeline; tests/system/test_placement_netns.py covers that path).
    gateway = launcher.gateway("gw", default_model, "--no-discovery", "--no-placement",
                               "--peer", f"127.0.0.1:{holder.ready[1]}", "--peer", f"127.0.0.1:{shard.ready[1]}")
    url = gateway_url(gateway)
    wait_for_nodes(url, 2)
    reference_llm.reset()
    expected = reference_llm.create_completion(PROMPT, max_tokens=32, temperature=0)["choices"][0]["text"]

    def complete() -> str:
        deadline_view = httpx.get(f"{url}/api/cluster", timeout=10).json()
        assert [p["kind"] for p in deadline_view["placements"]] == ["pipeline"], deadline_view
        reply = httpx.post(f"{url}/v1/completions", timeout=120,
                           json={"prompt": PROMPT, "max_tokens": 32, "temperature": 0})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["text"])

    assert complete() == expected

    # After a restart the cached layers are used again: nothing is fetched.
    shard.stop()
    again = launcher.start("shard-again", shard_args, env={"EDGEMESH_HOME": str(home)})
    load(f"127.0.0.1:{again.ready[1]}", launcher.cluster_key, sha, LayerRange(15, 30))
    assert "are in the shard cache" in again.log() and "fetched" not in again.log()


def test_a_replica_cannot_come_from_peers(launcher: Launcher) -> None:
    proc = launcher.start("bad", ["node", "--model-from-peers", "--role", "replica", "--port", "0",
                                  "--metrics-port", "0"], wait_ready=False)
    assert proc.popen.wait(timeout=60) == 2
    assert "drop --role replica" in proc.log() and "Traceback" not in proc.log()


def test_fetch_shard_refuses_bad_requests_and_keeps_serving(launcher: Launcher, default_model: Path) -> None:
    import grpc

    from mesh.transport.auth import sign
    from mesh.transport.generated import edgemesh_pb2, edgemesh_pb2_grpc
    from node.gguf import file_sha256

    sha = file_sha256(default_model)
    node = launcher.node("holder", default_model, "--role", "stage")
    size = default_model.stat().st_size

    async def calls() -> None:
        async with node_channel(f"127.0.0.1:{node.ready[1]}", launcher.cluster_key) as channel:
            stub = edgemesh_pb2_grpc.NodeStub(channel)

            async def fetch(sha256: str, ranges: list[tuple[int, int]]) -> list[Any]:
                request = edgemesh_pb2.FetchShardRequest(
                    model_sha256=sha256, ranges=[edgemesh_pb2.ByteRange(offset=o, length=n) for o, n in ranges])
                return [c async for c in stub.FetchShard(request, timeout=30,
                                                          metadata=sign(launcher.cluster_key,
                                                                        "/edgemesh.v1.Node/FetchShard", request))]

            for bad_sha, ranges, code in (("ab" * 32, [(0, 10)], grpc.StatusCode.NOT_FOUND),
                                          (sha, [(size - 5, 10)], grpc.StatusCode.INVALID_ARGUMENT),
                                          (sha, [(0, 0)], grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await fetch(bad_sha, ranges)
                assert raised.value.code() == code
            chunks = await fetch(sha, [(100, 3 << 20)])  # three 1 MiB chunks, the last with the range's hash
            assert [c.offset for c in chunks] == [100, 100 + (1 << 20), 100 + (2 << 20)]
            import hashlib

            with open(default_model, "rb") as f:
                f.seek(100)
                assert chunks[-1].range_sha256 == hashlib.sha256(f.read(3 << 20)).hexdigest()

    asyncio.run(calls())


@pytest.mark.parametrize("argv,message", [
    (["up", "--strategy", "pipeline", "--nodes", "2", "--stages", "3", "--port", "0"], "3 stages need"),
    (["plan", "--nodes", "3"], "--dry-run"),
    (["node", "--role", "bogus", "--port", "0", "--metrics-port", "0"], "--role"),
    (["node", "--step-port", "-2", "--port", "0", "--metrics-port", "0"], "--step-port must be"),
    (["node", "--decode-threads", "-3", "--port", "0", "--metrics-port", "0"], "--decode-threads must be 0"),
    (["up", "--strategy", "pipeline", "--decode-threads", "-3", "--port", "0"], "--decode-threads must be 0"),
    (["up", "--threads", "-1", "--port", "0"], "--threads must be 0"),
    (["bench", "--strategy", "pipeline", "--nodes", "3", "--decode-threads", "-3"], "--decode-threads must be 0"),
    (["gateway", "--strategy", "bogus", "--port", "0", "--no-discovery"], "--strategy must be one of"),
    (["gateway", "--stages", "-2", "--port", "0", "--no-discovery"], "--stages must be 0"),
    (["up", "--stages", "-1", "--port", "0"], "--stages must be 0"),
    (["plan", "--url", "http://127.0.0.1:9"], "cannot reach the gateway"),
    (["node", "--model-from-peers", "--role", "replica", "--port", "0", "--metrics-port", "0"], "drop --role replica"),
])
def test_cli_refuses_bad_flags_with_a_clear_message(argv: list[str], message: str) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-m", "mesh.cli", *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
