"""Approved models (--allow-model) and provenance shown, with real node and gateway processes
on loopback and tiny real GGUF files: a node or gateway whose own model is not approved
refuses to start; an approved node refuses LoadModel, LoadStage, FetchShard and Generate of
another model with PERMISSION_DENIED naming it, and goes on serving; a --model-from-peers
node fetches and caches nothing of a model not approved; a gateway never plans onto nor
routes to a node holding a model not approved; /api/cluster, /v1/models, `edgemesh status`
and `edgemesh model list` show the allow-list (or "any") and the model's provenance."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.config import Limits, NodeConfig, Timeouts
from mesh.errors import ModelNotAllowed, PeerError
from mesh.transport.channels import NodeClient
from mesh.types import LayerRange
from node.gguf import file_sha256
from tests.conftest import REPO, Launcher, Proc, gateway_url, wait_for_nodes
from tests.fixtures.tiny_gguf import PROVENANCE, SPECS, write_tiny_gguf
from tests.integration.test_startup_errors import NODE, assert_one_line_error, run_cli

LLAMA_Q8 = next(s for s in SPECS if s.name == "llama-q8_0")
OTHER_SHA = "c0ffee" * 10 + "beef"  # a well-formed sha256 of no file here
NAME = "Tiny Provenance"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A: a tiny model with provenance metadata; B: another tiny model (other weights, other sha256)."""
    directory = tmp_path_factory.mktemp("allowed-models")
    return {"A": write_tiny_gguf(directory / "model-a.gguf", LLAMA_Q8, metadata=PROVENANCE, name=NAME),
            "B": write_tiny_gguf(directory / "model-b.gguf", LLAMA_Q8, seed=1)}


@pytest.fixture(scope="module")
def shas(models: dict[str, Path]) -> dict[str, str]:
    return {k: file_sha256(p) for k, p in models.items()}


def address(proc: Proc) -> str:
    return f"127.0.0.1:{proc.ready[1]}"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def expected_provenance(sha: str) -> dict[str, Any]:
    return {"name": NAME, "organization": PROVENANCE["general.organization"],
            "basename": PROVENANCE["general.basename"], "finetune": "",
            "size_label": PROVENANCE["general.size_label"], "license": PROVENANCE["general.license"],
            "base_models": [
                {"name": "Tiny Base", "organization": "Base Org", "version": "",
                 "repo_url": "https://example.invalid/base", "url": ""},
                {"name": "Tiny Other Base", "organization": "", "version": "", "repo_url": "", "url": ""}],
            "source": PROVENANCE["general.source.url"], "quantized_by": PROVENANCE["general.quantized_by"],
            "file_type": "Q8_0", "sha256": sha}


def serves(url: str, timeout_s: float = 90.0) -> str:
    """The text of a short completion once the gateway has a placement (raises after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["ready"]:
            answer = httpx.post(f"{url}/v1/completions", json={"prompt": "the", "max_tokens": 3, "temperature": 0},
                                timeout=60)
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["text"])
        time.sleep(0.2)
    raise AssertionError(f"{url} has no placement after {timeout_s}s")


# ---------------------------------------------------------------------------- start-up

def test_a_node_or_gateway_whose_model_is_not_allowed_refuses_to_start(models: dict[str, Path],
                                                                     shas: dict[str, str]) -> None:
    env = {"EDGEMESH_CLUSTER_KEY": "allowed-models-test-key"}
    done = run_cli(*NODE, "--model", str(models["A"]), "--allow-model", shas["B"], env=env)
    assert_one_line_error(done, shas["A"], "is not in --allow-model", shas["B"])
    done = run_cli("gateway", "--model", str(models["A"]), "--port", "0", "--no-discovery",
                   env={**env, "EDGEMESH_ALLOWED_MODELS": f"{shas['B']},{OTHER_SHA}"})
    assert_one_line_error(done, shas["A"], "is not in --allow-model", shas["B"], OTHER_SHA)
    done = run_cli(*NODE, "--model", str(models["A"]), env={**env, "EDGEMESH_ALLOWED_MODELS": f"{shas['A']},x1"})
    assert_one_line_error(done, "'x1' is not a sha256")
    # `edgemesh up` gives its gateway (and nodes) the same list: refused before any node starts.
    done = run_cli("up", "--nodes", "1", "--port", "0", "--model", str(models["A"]), "--allow-model", OTHER_SHA,
                   env=env)
    assert_one_line_error(done, shas["A"], "is not in --allow-model", OTHER_SHA)
    assert "started node-1" not in done.stderr


# ---------------------------------------------------------------------------- a node

def test_an_allowed_node_refuses_every_rpc_of_another_model_and_goes_on_serving(
        launcher: Launcher, models: dict[str, Path], shas: dict[str, str]) -> None:
    node = launcher.node("allowed-node", models["A"], "--allow-model", shas["A"].upper(), "--no-advertise")

    async def scenario() -> None:
        client = NodeClient(address(node), launcher.cluster_key, Timeouts(), Limits())
        try:
            info = await client.info()
            assert info.allowed_models == (shas["A"],)
            refusals: dict[str, Callable[[], Awaitable[Any]]] = {
                "LoadModel": lambda: client.load_model(shas["B"], 0, 30, ""),
                "LoadStage": lambda: client.load_stage(shas["B"], LayerRange(0, 1), 256, 1, 30),
                "FetchShard": lambda: _drain(client.fetch_shard(shas["B"], [], header=True)),
            }
            for method, call in refusals.items():
                with pytest.raises(PeerError) as refused:
                    await call()
                assert refused.value.code == "PERMISSION_DENIED" and not refused.value.retryable
                assert f"{method}: model {shas['B']} is not in --allow-model" in str(refused.value), refused.value
            # Still serving, and its own model it ships and loads.
            header = [c async for c in client.fetch_shard(shas["A"], [], header=True)]
            assert header and header[0].offset == 0
            held = await client.load_model(shas["A"], 0, 60, "")
            assert held.sha256 == shas["A"]
        finally:
            await client.close()

    asyncio.run(scenario())
    assert node.popen.poll() is None
    assert "Traceback" not in node.log()


async def _drain(stream: Any) -> None:
    async for _ in stream:
        pass


def test_a_node_from_peers_fetches_nothing_of_a_model_not_allowed(
        launcher: Launcher, models: dict[str, Path], shas: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer offers only model B; a --model-from-peers node allowed only A refuses it
    with a clear error, and its shard cache holds nothing of B (not even the header)."""
    from node import shard_source

    holder = launcher.node("holder-of-b", models["B"], "--no-advertise")
    monkeypatch.setenv("EDGEMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(shard_source, "SOURCE_SEARCH_S", 2.0)  # the search window: the peer answers at once
    config = NodeConfig(model_from_peers=True, peer=(address(holder),), advertise=False, allowed_models=(shas["A"],))
    with pytest.raises(ModelNotAllowed, match=f"they hold only {shas['B']}, not in --allow-model"):
        asyncio.run(shard_source.shard_file_from_peers(config, launcher.cluster_key, Timeouts(), Limits()))
    shards = tmp_path / "home" / "shards"
    assert not shards.exists() or not any(shards.iterdir())


# ---------------------------------------------------------------------------- a gateway

def test_a_gateway_with_an_allow_list_never_uses_a_node_holding_another_model(
        launcher: Launcher, models: dict[str, Path], shas: dict[str, str]) -> None:
    node_a = launcher.node("node-a", models["A"], "--no-advertise")
    node_b = launcher.node("node-b", models["B"], "--no-advertise")
    gateway = launcher.start("allow-gateway", [
        "gateway", "--model", str(models["A"]), "--port", "0", "--no-discovery", "--strategy", "replica",
        "--peer", address(node_a), "--peer", address(node_b)],
        env={"EDGEMESH_ALLOWED_MODELS": f"{shas['A'].upper()},{OTHER_SHA}"})  # two, comma separated
    url = gateway_url(gateway)
    view = wait_for_nodes(url, 1)
    assert serves(url)
    view = httpx.get(f"{url}/api/cluster", timeout=5).json()
    assert view["allowed_models"]["any"] is False
    assert view["allowed_models"]["sha256"] == [shas["A"], OTHER_SHA]
    nodes = {n["name"]: n for n in view["nodes"]}
    assert nodes["node-a"]["state"] == "ready" and nodes["node-a"]["role"] == "replica"
    assert nodes["node-b"]["state"] == "incompatible", nodes["node-b"]
    assert shas["B"] in nodes["node-b"]["reason"] and "not in the gateway's --allow-model" in nodes["node-b"]["reason"]
    assert nodes["node-b"]["models"] == []  # nothing was loaded on it
    for placement in view["placements"]:
        assert all(s["name"] != "node-b" for s in placement["stages"])
    for _ in range(3):  # every request goes to node A
        serves(url)
    assert "LoadModel" not in _rpc_lines(node_b)
    status = cli("status", "--url", url)
    assert status.returncode == 0, status.stderr
    assert f"models: only {shas['A']}, {OTHER_SHA}" in status.stdout


def _rpc_lines(proc: Proc) -> str:
    metrics_port = proc.ready[2]
    return "\n".join(line for line in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text.splitlines()
                     if line.startswith("edgemesh_node_rpc_duration_seconds_count"))


def test_without_an_allow_list_any_model_is_allowed_and_provenance_is_shown(
        launcher: Launcher, models: dict[str, Path], shas: dict[str, str], tmp_path: Path) -> None:
    node = launcher.node("node-any", models["A"], "--no-advertise")
    gateway = launcher.start("any-gateway", ["gateway", "--model", str(models["A"]), "--port", "0",
                                             "--no-discovery", "--peer", address(node)])
    url = gateway_url(gateway)
    view = wait_for_nodes(url, 1)
    assert view["allowed_models"] == {"any": True, "sha256": [], "text": "any (no --allow-model)"}
    assert view["nodes"][0]["allowed_models"] == []
    assert view["model"]["provenance"] == expected_provenance(shas["A"])
    listed = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
    assert [m["provenance"] for m in listed] == [expected_provenance(shas["A"])]
    status = cli("status", "--url", url)
    assert status.returncode == 0, status.stderr
    assert "models: any (no --allow-model)" in status.stdout
    assert f"provenance: {NAME}; by EdgeMesh Tests; licence apache-2.0; Q8_0" in status.stdout
    assert f"sha256 {shas['A'][:12]}" in status.stdout

    # `edgemesh model list` reads the provenance of a cached file from the file itself.
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(models["A"], home / "models" / "tiny-provenance.gguf")
    listing = cli("model", "list", env={"EDGEMESH_HOME": str(home)})
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if "provenance:" in x)
    for fragment in (NAME, "by EdgeMesh Tests", "licence apache-2.0", "Q8_0", "base Tiny Base, Tiny Other Base",
                     "source https://example.invalid/tiny", "quantized by tiny_gguf.py", f"sha256 {shas['A'][:12]}"):
        assert fragment in line, line


def test_up_passes_its_allow_list_to_its_nodes_and_gateway(launcher: Launcher, models: dict[str, Path],
                                                          shas: dict[str, str]) -> None:
    up = launcher.start("up", ["up", "--nodes", "1", "--port", "0", "--threads", "1", "--model", str(models["A"]),
                               "--allow-model", shas["A"]])
    view = wait_for_nodes(gateway_url(up), 1)
    assert view["allowed_models"]["sha256"] == [shas["A"]]
    assert [n["allowed_models"] for n in view["nodes"]] == [[shas["A"]]]
