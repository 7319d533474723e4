"""Faults on a simulated LAN: every node and the gateway on its own network namespace.

Four `edgemesh node` processes (198.18.<k>.10-13) and a gateway (198.18.<k>.14, with an
API key, as a non-loopback gateway must have, and `--strategy pipeline --stages 3`) find
each other by mDNS across a Linux bridge (no --peer). The gateway's placement controller
places a 3-stage pipeline of the default model on three of the nodes (equal nodes: an even
split, [0,10), [10,20), [20,30)); the fourth stays spare. The test process talks to the
gateway and the nodes from the root namespace, through the bridge address 198.18.<k>.1.

Faults: a link cut mid-stream, a stage frozen by SIGSTOP for short stalls, a stage
drained by SIGTERM mid-stream, and a new node joining mid-stream. In every case the
client's greedy stream must equal llama-cpp-python's own greedy output.
Measured times are printed (run pytest with -s to see them).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, START_TIMEOUT_S, Proc, metric_lines, read_completion_stream, wait_for_ready_file
from tests.system.netns import TestNet, unavailable_reason

_UNAVAILABLE = unavailable_reason()
if _UNAVAILABLE:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.netns]

PROMPT = "The history of the printing press"
MAX_TOKENS = 64
BODY = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
STAGES = 3
NODES = 4  # hosts 0-3: nodes (three stages and a spare, as the controller places them); host 4: the gateway
GATEWAY_HOST = NODES
RECOVERY_BUDGET_S = 10.0  # detection (stage_step_s = 5 s) plus re-plan and replay
STOP_EVERY_S = 5.0
STOP_FOR_S = 0.5
STOP_WINDOW_S = 60.0
DRAIN_VISIBLE_S = 1.0


# ---------------------------------------------------------------------------- the mesh


@dataclass
class NetMesh:
    net: TestNet
    workdir: Path
    cluster_key: str
    api_key: str
    model: Path
    gateway: Proc | None = None
    url: str = ""
    nodes: dict[int, Proc] = field(default_factory=dict)  # host index -> node process
    node_ids: dict[int, str] = field(default_factory=dict)
    stage_hosts: list[int] = field(default_factory=list)  # hosts of the pipeline's stages, in order
    spare_host: int = -1
    layers: list[list[int]] = field(default_factory=list)  # each stage's [first, last) as placed

    # -------------------------------------------------------------- processes

    def _start(self, host: int, name: str, args: list[str]) -> Proc:
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "EDGEMESH_CLUSTER_KEY": self.cluster_key, "EDGEMESH_API_KEY": self.api_key,
               # stages take turns on 2 shared cores: idle OpenMP workers must sleep, not spin
               "OMP_WAIT_POLICY": "PASSIVE"}
        with open(log_path, "wb") as log_file:
            popen = self.net.popen(host, [sys.executable, "-m", "mesh.cli", *args, "--ready-file", str(ready)],
                                   stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=REPO)
        return Proc(name, popen, log_path)

    def _wait_ready(self, proc: Proc) -> None:
        proc.ready = wait_for_ready_file(proc, self.workdir / f"{proc.name}.ready")

    def start_node(self, host: int, *, wait: bool = True) -> Proc:
        name = f"node-{host}"
        proc = self._start(host, name, [
            "node", "--model", str(self.model), "--name", name, "--threads", "1",
            "--host", self.net.hosts[host].address, "--port", "0", "--metrics-port", "0", "--step-port", "0"])
        self.nodes[host] = proc
        if wait:
            self.node_ready(host)
        return proc

    def node_ready(self, host: int) -> str:
        proc = self.nodes[host]
        if not proc.ready:
            self._wait_ready(proc)
            self.node_ids[host] = proc.ready[3]
        return self.node_ids[host]

    def start_gateway(self, host: int) -> None:
        # No --peer: the nodes are found by mDNS across the bridge. The API key comes from
        # the environment (EDGEMESH_API_KEY), so `ps` does not show it.
        self.gateway = self._start(host, "gateway", [
            "gateway", "--model", str(self.model), "--host", self.net.hosts[host].address, "--port", "0",
            "--strategy", "pipeline", "--stages", str(STAGES)])
        self._wait_ready(self.gateway)
        address, port = self.gateway.ready[:2]
        self.url = f"http://{address}:{port}"

    # -------------------------------------------------------------- HTTP

    def http(self, timeout: float = 10.0) -> httpx.Client:
        """A client that reaches the gateway through the bridge (never through a proxy)."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=timeout, trust_env=False)

    def cluster(self) -> dict[str, Any]:
        with self.http() as client:
            response = client.get("/api/cluster")
        response.raise_for_status()
        view: dict[str, Any] = response.json()
        return view

    def metrics(self) -> str:
        with self.http() as client:
            return client.get("/metrics").text

    def node_view(self, host: int, view: dict[str, Any] | None = None) -> dict[str, Any]:
        view = view or self.cluster()
        return next(n for n in view["nodes"] if n["id"] == self.node_ids[host])

    def wait_cluster(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                     timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        view: dict[str, Any] = {}
        while time.monotonic() < deadline:
            view = self.cluster()
            if predicate(view):
                return view
            time.sleep(0.1)
        raise AssertionError(f"{what} not seen within {timeout}s: {json.dumps(view)[:3000]}\n"
                             f"gateway log:\n{self.gateway.log()[-3000:] if self.gateway else ''}")

    def logs(self) -> str:
        procs = [p for p in (self.gateway, *self.nodes.values()) if p is not None]
        return "\n".join(f"----- {p.name} -----\n{p.log()[-2500:]}" for p in procs)


def pipeline_of(view: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages of the (single) pipeline placement, or [] when there is none."""
    pipelines = [p for p in view["placements"] if p["kind"] == "pipeline"]
    return pipelines[0]["stages"] if pipelines else []


@pytest.fixture(scope="module")
def expected(reference_llm: Any) -> str:
    """llama-cpp-python's own greedy completion of PROMPT."""
    reference_llm.reset()
    text: str = reference_llm.create_completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0)["choices"][0]["text"]
    return text


@pytest.fixture
def mesh(request: pytest.FixtureRequest, tmp_path: Path, default_model: Path) -> Iterator[NetMesh]:
    """Four nodes and a gateway, each in its own namespace; the controller's 3-stage
    pipeline on three of them, the fourth spare."""
    with TestNet(NODES + 1, tmp_path) as net:
        m = NetMesh(net, tmp_path, secrets.token_urlsafe(24), secrets.token_urlsafe(16), default_model)
        print(f"\nnetwork 198.18.{net.subnet}.0/24 on bridge {net.bridge}; logs in {tmp_path}")
        m.start_gateway(GATEWAY_HOST)
        for host in range(NODES):
            m.start_node(host, wait=False)  # start together, wait together
        for host in range(NODES):
            m.node_ready(host)
        everyone = set(m.node_ids.values())
        m.wait_cluster(lambda v: {n["id"] for n in v["nodes"] if n["state"] == "ready"} >= everyone,
                       "all four nodes discovered over mDNS and ready")
        view = m.cluster()
        for host, proc in m.nodes.items():  # signals go to the right process
            assert m.node_view(host, view)["pid"] == proc.pid
        view = m.wait_cluster(lambda v: len(pipeline_of(v)) == STAGES and v["placement"]["converged"],
                              "the controller's 3-stage pipeline")
        host_of = {node_id: host for host, node_id in m.node_ids.items()}
        m.stage_hosts = [host_of[s["node"]] for s in pipeline_of(view)]
        m.layers = [s["layers"] for s in pipeline_of(view)]
        m.spare_host = next(h for h in range(NODES) if h not in m.stage_hosts)
        assert m.node_view(m.spare_host, view)["role"] == "spare"
        failed_before = request.session.testsfailed
        yield m
        if request.session.testsfailed > failed_before:
            print(m.logs())


# ---------------------------------------------------------------------------- streaming


@dataclass
class Stream:
    text: str
    finish: str
    chunk_times: list[float]  # time.monotonic() of every SSE chunk
    started: float
    ended: float
    route: str

    @property
    def longest_gap(self) -> float:
        times = [self.started, *self.chunk_times]
        return max(b - a for a, b in itertools.pairwise(times))


def stream(m: NetMesh, on_chunk: Callable[[int], None] | None = None) -> Stream:
    """One greedy streamed completion; `on_chunk(n)` runs after the n-th chunk arrives."""
    started = time.monotonic()
    with m.http(timeout=120) as client, client.stream("POST", "/v1/completions", json=BODY) as response:
        assert response.status_code == 200, response.read().decode(errors="replace")
        route = response.headers.get("x-edgemesh-route", "")
        got = read_completion_stream(response, on_chunk)
    return Stream("".join(got.pieces), got.finish, got.times, started, time.monotonic(), route)


def metric_value(text: str, name: str) -> float:
    return sum(metric_lines(text, name).values())


# ---------------------------------------------------------------------------- tests


def test_cut_link_of_a_middle_stage_at_token_20_fails_over_to_the_spare(mesh: NetMesh, expected: str) -> None:
    clean = stream(mesh)
    assert clean.text == expected
    print(f"clean stream: {clean.ended - clean.started:.2f}s, longest gap {clean.longest_gap:.3f}s")

    victim, spare = mesh.stage_hosts[1], mesh.spare_host
    cut_at: list[float] = []

    def cut_at_20(chunks: int) -> None:
        if chunks == 20 and not cut_at:
            mesh.net.cut(victim)
            cut_at.append(time.monotonic())

    faulty = stream(mesh, cut_at_20)
    assert cut_at, "the stream ended before token 20"
    assert faulty.text == expected
    assert faulty.finish == "length"
    after_cut = [t for t in faulty.chunk_times if t > cut_at[0]]
    resumed = after_cut[0] - cut_at[0]
    metrics = mesh.metrics()
    detect = metric_value(metrics, "edgemesh_failover_detect_seconds_sum")
    recover = metric_value(metrics, "edgemesh_failover_recover_seconds_sum")
    print(f"link cut after token 20: stall (longest gap between SSE chunks) {faulty.longest_gap:.3f}s, "
          f"cut -> next token {resumed:.3f}s; gateway: detected in {detect:.3f}s, recovered in {recover:.3f}s; "
          f"stream {faulty.ended - faulty.started:.2f}s vs {clean.ended - clean.started:.2f}s clean")
    assert faulty.longest_gap <= RECOVERY_BUDGET_S
    assert resumed <= RECOVERY_BUDGET_S

    assert 'edgemesh_failovers_total{from="pipeline",reason="node_error",to="pipeline"} 1.0' in metrics
    # The controller gave the lost stage, whole, to the spare: one load, the survivors untouched.
    assert metric_lines(metrics, "edgemesh_replans_total") == {'edgemesh_replans_total{reason="initial"}': 1.0,
                                                               'edgemesh_replans_total{reason="repair"}': 1.0}
    assert metric_value(metrics, "edgemesh_replayed_tokens_total") >= 19

    view = mesh.cluster()
    first, _, last = mesh.stage_hosts
    assert [(s["node"], s["layers"]) for s in pipeline_of(view)] == [
        (mesh.node_ids[first], mesh.layers[0]), (mesh.node_ids[spare], mesh.layers[1]),
        (mesh.node_ids[last], mesh.layers[2])]
    spare_view = mesh.node_view(spare, view)
    assert spare_view["state"] == "ready" and spare_view["role"] == "stage" and spare_view["layers"] == mesh.layers[1]
    assert mesh.node_view(victim, view)["state"] != "ready"

    again = stream(mesh)  # the repaired pipeline serves the next request as well
    assert again.text == expected
    assert mesh.node_ids[victim] not in again.route.split(",")


def test_short_sigstop_stalls_of_a_stage_are_not_failures(mesh: NetMesh, expected: str) -> None:
    victim = mesh.stage_hosts[1]
    pid = mesh.nodes[victim].pid
    before = mesh.metrics()
    replans_before = metric_lines(before, "edgemesh_replans_total")
    stages_before = pipeline_of(mesh.cluster())
    done = threading.Event()
    pauses: list[float] = []  # when each SIGSTOP began

    def stall_periodically() -> None:
        started = time.monotonic()
        while not done.is_set() and time.monotonic() - started < STOP_WINDOW_S:
            if done.wait(STOP_EVERY_S - STOP_FOR_S):
                break
            os.kill(pid, signal.SIGSTOP)
            pauses.append(time.monotonic())
            try:
                time.sleep(STOP_FOR_S)
            finally:
                os.kill(pid, signal.SIGCONT)

    staller = threading.Thread(target=stall_periodically, name="sigstop", daemon=True)
    streams: list[Stream] = []
    staller.start()
    try:
        while staller.is_alive():
            streams.append(stream(mesh))
    finally:
        done.set()
        staller.join(timeout=10)
        os.kill(pid, signal.SIGCONT)

    wanted = ",".join(mesh.node_ids[h] for h in mesh.stage_hosts)
    print(f"SIGSTOP {STOP_FOR_S}s every {STOP_EVERY_S}s for {STOP_WINDOW_S:.0f}s: {len(pauses)} stalls, "
          f"{len(streams)} streams, longest gap {max(s.longest_gap for s in streams):.3f}s, "
          f"streams took {min(s.ended - s.started for s in streams):.2f}-"
          f"{max(s.ended - s.started for s in streams):.2f}s")
    assert len(pauses) >= int(STOP_WINDOW_S / STOP_EVERY_S) - 1
    stalled = [s for s in streams if any(s.started < p < s.ended for p in pauses)]
    assert stalled, "no stall fell inside a stream"
    for s in streams:
        assert s.text == expected
        assert s.finish == "length"
        assert s.route == wanted  # every request on the original pipeline
    metrics = mesh.metrics()
    assert metric_value(metrics, "edgemesh_failovers_total") == 0, metric_lines(metrics, "edgemesh_failovers_total")
    assert metric_lines(metrics, "edgemesh_replans_total") == replans_before
    view = mesh.cluster()
    assert pipeline_of(view) == stages_before
    assert mesh.node_view(victim, view)["state"] == "ready"


def test_sigterm_drains_a_stage_mid_stream(mesh: NetMesh, expected: str) -> None:
    victim = mesh.stage_hosts[1]
    proc = mesh.nodes[victim]
    victim_id = mesh.node_ids[victim]
    signalled: list[float] = []
    seen: dict[str, float] = {}  # what the gateway showed, and when (seconds after SIGTERM)
    alive_while_streaming: list[bool] = []

    def watch_cluster() -> None:
        with mesh.http(timeout=5) as client:
            while time.monotonic() - signalled[0] < 5 and len(seen) < 2:
                view = client.get("/api/cluster").json()
                elapsed = time.monotonic() - signalled[0]
                state = next(n["state"] for n in view["nodes"] if n["id"] == victim_id)
                if state == "draining":
                    seen.setdefault("draining", elapsed)
                if not any(victim_id in {s["node"] for s in p["stages"]} for p in view["placements"]):
                    seen.setdefault("unplaced", elapsed)
                time.sleep(0.02)

    watcher = threading.Thread(target=watch_cluster, name="watch-cluster", daemon=True)

    def sigterm_at_20(chunks: int) -> None:
        if chunks == 20 and not signalled:
            os.kill(proc.pid, signal.SIGTERM)
            signalled.append(time.monotonic())
            watcher.start()
        if chunks == MAX_TOKENS - 1:
            alive_while_streaming.append(proc.popen.poll() is None)

    result = stream(mesh, sigterm_at_20)
    watcher.join(timeout=10)
    assert signalled, "the stream ended before token 20"
    assert result.text == expected
    assert result.finish == "length"
    assert alive_while_streaming == [True], "the node exited before the stream it served ended"
    print(f"SIGTERM after token 20: gateway showed the node draining after {seen.get('draining', -1):.3f}s, "
          f"out of every placement after {seen.get('unplaced', -1):.3f}s; longest gap {result.longest_gap:.3f}s")
    assert seen.get("draining", 99.0) <= DRAIN_VISIBLE_S
    assert seen.get("unplaced", 99.0) <= DRAIN_VISIBLE_S
    metrics = mesh.metrics()
    assert metric_value(metrics, "edgemesh_failovers_total") == 0  # it finished where it started

    assert proc.popen.wait(timeout=30) == 0
    exited = time.monotonic() - signalled[0]
    log = proc.log()
    print(f"the node exited {exited:.2f}s after SIGTERM")
    assert "draining: 1 request(s) in flight" in log, log[-3000:]
    assert "drain timed out" not in log, log[-3000:]
    assert f"node node-{victim} stopped" in log, log[-3000:]


def test_a_node_joining_mid_stream_becomes_a_spare_without_disturbing_it(mesh: NetMesh, expected: str) -> None:
    wanted = ",".join(mesh.node_ids[h] for h in mesh.stage_hosts)
    host = mesh.net.add_host().index  # a device plugged into the LAN
    joined: dict[str, float] = {}
    done = threading.Event()

    def watch_for_join() -> None:
        with mesh.http(timeout=5) as client:
            while not done.is_set():
                proc = mesh.nodes[host]
                ready = mesh.workdir / f"{proc.name}.ready"
                if "ready_file" not in joined and ready.exists() and ready.read_text().strip():
                    joined["ready_file"] = time.monotonic()
                view = client.get("/api/cluster").json()
                node = next((n for n in view["nodes"] if n["name"] == proc.name), None)
                if node is not None:
                    joined.setdefault("seen", time.monotonic())
                    if node["state"] == "ready" and node["role"] == "spare":
                        joined["spare"] = time.monotonic()
                        return
                time.sleep(0.05)

    started = time.monotonic()
    mesh.start_node(host, wait=False)
    watcher = threading.Thread(target=watch_for_join, name="watch-join", daemon=True)
    watcher.start()
    streams: list[Stream] = []
    try:
        while watcher.is_alive() and time.monotonic() - started < START_TIMEOUT_S:
            streams.append(stream(mesh))
    finally:
        done.set()
        watcher.join(timeout=10)
    assert "spare" in joined, f"the new node never showed as a ready spare\n{mesh.nodes[host].log()[-3000:]}"
    mesh.node_ready(host)
    during = [s for s in streams if s.started < joined["seen"] < s.ended]
    print(f"node joined: ready file {joined['ready_file'] - started:.2f}s after start, in /api/cluster "
          f"{joined['seen'] - joined['ready_file']:.2f}s later (mDNS), ready spare at "
          f"{joined['spare'] - started:.2f}s; {len(streams)} streams, {len(during)} in flight when it appeared")
    assert during, "no stream was in flight when the node appeared"
    for s in streams:
        assert s.text == expected
        assert s.finish == "length"
        assert s.route == wanted
    view = mesh.cluster()
    assert [s["node"] for s in pipeline_of(view)] == wanted.split(",")
    new = mesh.node_view(host, view)
    assert new["state"] == "ready" and new["role"] == "spare" and new["layers"] is None
    assert new["address"].startswith(mesh.net.hosts[host].address + ":")
    metrics = mesh.metrics()
    assert metric_value(metrics, "edgemesh_failovers_total") == 0
