"""EdgeMesh on Ray: `edgemesh ray up` places node actors over a Ray cluster, serves the
OpenAI API with llama.cpp's greedy output, survives a SIGKILLed actor by replay while
Ray restarts it, and `edgemesh ray down` removes it all.

Ray runs small here (1 CPU and 100 MiB of object store per Ray node, no dashboard) and
in its own temporary directory, and only processes these tests started are stopped: by
`Cluster.shutdown()`, or by the session id of the `ray start` we ran (never `ray stop`,
which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Launcher, Proc, gateway_url, stream_completion, wait_for_nodes
from tests.harness.processes import proc_table

ray = pytest.importorskip("ray", reason="the Ray backend needs the ray extra: pip install -e .[ray]")

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press"
OBJECT_STORE_BYTES = 100 * 2**20
NAMES = ["edgemesh-node-1", "edgemesh-node-2", "edgemesh-node-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    """Ray's temp dir for this module: short (Ray's unix sockets live under it) and ours alone.
    RAY_TMPDIR also moves the address file Ray writes for `ray.init()` out of /tmp/ray."""
    path = Path(tempfile.mkdtemp(prefix="emray-", dir="/tmp"))
    (path / "ray").mkdir()
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(ray_tmp: Path) -> Iterator[Any]:
    """Three Ray nodes on this machine, and this test process connected as a driver."""
    from ray.cluster_utils import Cluster

    small: dict[str, Any] = {"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES}
    cluster: Any = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False,
                                                            "dashboard_port": free_port()})
    try:
        for _ in range(2):
            cluster.add_node(**small)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="edgemesh", logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@dataclass
class RayMesh:
    proc: Proc
    url: str


@pytest.fixture(scope="module")
def ray_mesh(ray_cluster: Any, default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayMesh]:
    launcher = Launcher(tmp_path_factory.mktemp("ray-up"))
    try:
        started = time.monotonic()
        proc = launcher.start("ray-up", ["ray", "up", "--address", ray_cluster.address, "--nodes", "3",
                                         "--strategy", "pipeline", "--port", "0", "--threads", "1",
                                         "--model", str(default_model)])
        print(f"ray up ready in {time.monotonic() - started:.1f}s")
        yield RayMesh(proc, gateway_url(proc))
    finally:
        launcher.stop_all()


def test_node_actors_go_round_robin_and_share_their_ray_node() -> None:
    from mesh.ray.placement import alive_nodes, assign_slots

    nodes = alive_nodes([
        {"NodeID": "b", "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 4.0, "memory": 8e9}},
        {"NodeID": "x", "Alive": False, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 64.0}},
        {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.3",
         "Resources": {"CPU": 2.0, "memory": 2e9, "node:__internal_head__": 1.0}},
    ])
    assert [n.node_id for n in nodes] == ["a", "b"]  # the head first, dead nodes never
    slots = assign_slots(nodes, 3, threads=0, memory_limit=0)
    assert [(s.name, s.ray_node.node_id, s.threads, s.memory_budget) for s in slots] == [
        ("node-1", "a", 1, 1_000_000_000), ("node-2", "b", 4, 8_000_000_000), ("node-3", "a", 1, 1_000_000_000)]
    capped = assign_slots(nodes, 2, threads=1, memory_limit=60_000_000)
    assert [(s.threads, s.memory_budget) for s in capped] == [(1, 60_000_000), (1, 60_000_000)]


def describe(name: str, timeout: float = 60) -> dict[str, Any]:
    """What a node actor says about itself; waits for an actor Ray is restarting."""
    result: dict[str, Any] = ray.get(ray.get_actor(name).describe.remote(), timeout=timeout)
    return result


def stream_greedy(url: str, on_chunk: Callable[[int], None] | None = None) -> tuple[str, str]:
    """The streamed text of a greedy 64-token completion, and its finish_reason."""
    text, _, finish = stream_completion(url, {"prompt": PROMPT, "max_tokens": 64, "temperature": 0}, on_chunk)
    return text, finish


def expected_text(reference_llm: Any) -> str:
    reference_llm.reset()
    text: str = reference_llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"]
    return text


def test_actors_spread_over_ray_nodes_and_greedy_parity(ray_cluster: Any, ray_mesh: RayMesh,
                                                       reference_llm: Any) -> None:
    assert sorted(ray.util.list_named_actors()) == NAMES
    actors = [describe(name) for name in NAMES]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 3
    assert {a["ray_node_id"] for a in actors} == alive, "one node actor per Ray node"

    view = wait_for_nodes(ray_mesh.url, 3)
    assert {n["id"] for n in view["nodes"]} == {a["node_id"] for a in actors}
    assert {n["pid"] for n in view["nodes"]} == {a["pid"] for a in actors}
    [pipeline] = view["placements"]
    assert pipeline["kind"] == "pipeline"
    assert [s["layers"] for s in pipeline["stages"]] == [[0, 10], [10, 20], [20, 30]]

    response = httpx.post(f"{ray_mesh.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 64,
                                                                  "temperature": 0}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected_text(reference_llm)


def test_sigkill_of_a_node_actor_mid_stream_replays_and_ray_restarts_it(ray_mesh: RayMesh,
                                                                         reference_llm: Any) -> None:
    expected = expected_text(reference_llm)
    view = wait_for_nodes(ray_mesh.url, 3)
    pipeline = next(p for p in view["placements"] if p["kind"] == "pipeline")
    victim_node = pipeline["stages"][1]["node"]
    actors = {name: describe(name) for name in NAMES}
    victim = next(name for name, a in actors.items() if a["node_id"] == victim_node)
    old_pid = actors[victim]["pid"]
    killed: list[float] = []

    def kill_at_20(chunks: int) -> None:
        if chunks == 20 and not killed:
            os.kill(old_pid, signal.SIGKILL)
            killed.append(time.monotonic())

    started = time.monotonic()
    text, finish = stream_greedy(ray_mesh.url, kill_at_20)
    assert killed, "the stream ended before token 20"
    print(f"stream with a SIGKILLed actor took {time.monotonic() - started:.2f}s")
    assert text == expected
    assert finish == "length"

    # Ray restarts the actor's process: a new pid, and a new EdgeMesh node that the
    # gateway finds through Ray and keeps as a spare.
    restarted = describe(victim, timeout=120)
    assert restarted["pid"] != old_pid
    assert restarted["node_id"] != victim_node
    assert restarted["ray_node_id"] == actors[victim]["ray_node_id"], "restarted on its own Ray node"
    print(f"actor {victim} back as pid {restarted['pid']} {time.monotonic() - killed[0]:.1f}s after the kill")
    deadline = time.monotonic() + 60
    while True:
        nodes = {n["id"]: n for n in httpx.get(f"{ray_mesh.url}/api/cluster", timeout=10).json()["nodes"]}
        back = nodes.get(restarted["node_id"])
        # A spare, unless it came back quickly enough to take the lost layers itself.
        if back is not None and back["state"] == "ready" and back["role"] in ("spare", "stage"):
            break
        assert time.monotonic() < deadline, f"the restarted node never became ready: {back}"
        time.sleep(0.5)
    print(f"the restarted node is a ready {back['role']}")
    metrics = httpx.get(f"{ray_mesh.url}/metrics", timeout=10).text
    assert 'edgemesh_failovers_total{from="pipeline",reason="node_error",to="pipeline"} 1.0' in metrics

    # The repaired mesh still answers exactly as llama.cpp does.
    again, _ = stream_greedy(ray_mesh.url)
    assert again == expected


def _session_pids(sid: int) -> list[int]:
    """Live processes of one session: everything a `ray start` we ran has spawned."""
    return [row.pid for row in proc_table() if row.state != "Z" and row.session == sid]


def _stop_session(sid: int, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(sid):
            return


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[str]:
    """A head started as an operator would (`ray start --head`), in its own session so that
    exactly its processes can be stopped afterwards."""
    ray_bin = Path(sys.executable).parent / "ray"
    temp = Path(tempfile.mkdtemp(prefix="emrh-", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    start = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--port", str(port), "--num-cpus", "2",
         "--object-store-memory", str(OBJECT_STORE_BYTES), "--include-dashboard=false",
         "--dashboard-port", str(free_port()), "--temp-dir", str(temp / "ray"), "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        if start.poll() is None:
            start.kill()
        _stop_session(start.pid)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_up_against_a_ray_start_head_serves_the_openai_api(ray_head: str, default_model: Path,
                                                               tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    port = free_port()
    try:
        up = launcher.start("ray-up", ["ray", "up", "--address", ray_head, "--nodes", "3", "--strategy", "pipeline",
                                       "--port", str(port), "--threads", "1", "--model", str(default_model)])
        url = gateway_url(up)
        assert url == f"http://127.0.0.1:{port}"
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [default_model.stem]
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0})
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"]
        assert len(chat.headers["x-edgemesh-route"].split(",")) == 3  # served through all three stages

        # The namespace is taken: a second `ray up` says so instead of adopting or
        # duplicating the running actors.
        again = subprocess.run([sys.executable, "-m", "mesh.cli", "ray", "up", "--address", ray_head, "--nodes", "1",
                                "--port", "0", "--model", str(default_model)],
                               capture_output=True, text=True, timeout=120, cwd=REPO)
        assert again.returncode == 2 and "edgemesh ray down" in again.stderr, again.stderr[-3000:]

        down = subprocess.run([sys.executable, "-m", "mesh.cli", "ray", "down", "--address", ray_head],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert down.returncode == 0, down.stderr[-3000:]
        assert "removed 3 node actor(s)" in down.stdout
        # With every actor gone, `ray up` has nothing left to serve and stops by itself.
        assert up.popen.wait(timeout=60) == 0, up.log()[-3000:]
    finally:
        launcher.stop_all()
