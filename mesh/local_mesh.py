"""`edgemesh up`: N node processes and an in-process gateway on this machine.

Nodes are real `edgemesh node` processes on ephemeral loopback ports, sharing a cluster
key made for this mesh (so two local meshes never adopt each other's nodes over mDNS).
The gateway finds them by mDNS and, to be quick, also by the address each node writes
to its ready file; membership deduplicates by node id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.config import GatewayConfig, Timeouts, check_thread_counts
from mesh.discovery import Peer
from mesh.errors import ConfigError, ModelError
from mesh.model_store import resolve
from mesh.planner import PeerCapability, Plan, Policy, contiguous_ranges, even_split, plan
from mesh.types import LayerRange, NodeId
from node.compute import STAGE_OPENMP_ENV
from node.gguf import inspect as inspect_gguf
from node.probe import default_threads

if TYPE_CHECKING:
    from mesh.gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)

NODE_START_TIMEOUT_S = 300.0  # a slow device may take minutes to hash and load a big model
NODE_STOP_GRACE_S = 70.0  # a node drains for up to Timeouts.drain_s (60 s) before exiting


@dataclass(frozen=True)
class LocalMeshOptions:
    nodes: int = 2
    host: str = "127.0.0.1"
    port: int = 8080
    model: str = "default"
    strategy: str = "auto"
    threads: int = 0
    slots: int = 1
    n_ctx: int = 2048
    prefill_chunk: int = 0  # tokens per stage compute step (0 = 512; the planner may lower it)
    api_key: str = ""
    policy: str = "local-only"  # routing between the mesh and a cloud upstream (see GatewayConfig)
    cloud_url: str = ""
    cloud_model: str = ""
    cloud_key_env: str = ""
    cluster_key: str = ""
    ready_file: str = ""
    memory_limit: str = "0"
    decode_threads: int = 0  # threads of single-token pipeline steps (0 = as many as for prefill)
    stages: int = 0  # pipeline: how many stages (0 = one per node); the other nodes stay spare
    split: tuple[int, ...] = ()  # pipeline: layers per stage (default: an even split)


@dataclass
class NodeProcess:
    name: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    peer: Peer | None = None

    def node_id(self) -> NodeId:
        if self.peer is None or self.peer.node_id is None:
            raise ModelError(f"{self.name} has not started")
        return self.peer.node_id

    def poll_ready(self) -> Peer | None:
        """Where the node serves, once it has written its ready file ('host port metrics_port id')."""
        if self.peer is None and self.ready_file.exists():
            fields = self.ready_file.read_text().split()
            if len(fields) >= 4:
                self.peer = Peer(address=f"{fields[0]}:{fields[1]}", node_id=NodeId(fields[3]),
                                 metrics_port=int(fields[2]))
        return self.peer


STRATEGIES = ("auto", "replica", "pipeline")
STAGE_LOAD_TIMEOUT_S = 300.0


def threads_per_node(nodes: int, requested: int) -> int:
    """A fair share of this machine's cores for each replica node: replicas run at the same
    time. (Pipeline stages take turns and use every core; see spawn_node.)"""
    if requested > 0:
        return requested
    return max(1, (os.cpu_count() or 1) // nodes)


def split_layers(n_layers: int, stages: int, split: tuple[int, ...] = ()) -> list[LayerRange]:
    """Contiguous layer ranges: the given split, or as even as possible (earlier stages
    take the remainder)."""
    if split:
        if len(split) != stages:
            raise ConfigError(f"--split has {len(split)} parts but there are {stages} stages")
        if any(n < 1 for n in split) or sum(split) != n_layers:
            raise ConfigError(f"--split must be positive and add up to the model's {n_layers} layers, "
                              f"not {sum(split)}")
        return contiguous_ranges(split)
    if not 1 <= stages <= n_layers:
        raise ConfigError(f"cannot split {n_layers} layers into {stages} stages")
    return even_split(n_layers, stages)


def spawn_node(index: int, model_path: Path, options: LocalMeshOptions, cluster_key: str,
               workdir: Path, role: str) -> NodeProcess:
    name = f"node-{index + 1}"
    ready = workdir / f"{name}.ready"
    # Replicas run at once and share the cores; stages take turns, so each step of a stage,
    # prefill chunk or single token, uses every core.
    threads = (options.threads or default_threads()) if role == "stage" \
        else threads_per_node(options.nodes, options.threads)
    decode_threads = options.decode_threads or threads
    command = [
        sys.executable, "-m", "mesh.cli", "node", "--model", str(model_path), "--name", name,
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--step-port", "0",
        "--threads", str(threads),
        "--decode-threads", str(decode_threads),
        "--role", role,
        "--slots", str(options.slots), "--n-ctx", str(options.n_ctx),
        "--memory-limit", options.memory_limit, "--ready-file", str(ready),
    ]
    # The key goes by environment, not argv, so `ps` does not show it.
    env = {**os.environ, "EDGEMESH_CLUSTER_KEY": cluster_key}
    if role == "stage":
        for variable, value in STAGE_OPENMP_ENV.items():
            env.setdefault(variable, value)  # what the user set wins
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    log.info("started %s (pid %d)", name, process.pid)
    return NodeProcess(name, process, ready)


def stop_nodes(nodes: list[NodeProcess], grace_s: float = NODE_STOP_GRACE_S) -> None:
    """SIGTERM (drain) every node we started, then SIGKILL what outlives the grace period."""
    for node in nodes:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for node in nodes:
        try:
            node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", node.name, grace_s)
            node.process.kill()
            node.process.wait()


def _banner(url: str, model_name: str, nodes: int, api_key: str) -> str:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return (
        f"\nEdgeMesh is up: {nodes} node(s) serving {model_name}\n"
        f"  web page: {url}/\n"
        f"  API:      {url}/v1\n"
        f"  metrics:  {url}/metrics\n"
        f"  try:      curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        "              -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 64}'\n"
        "  stop:     Ctrl-C\n\n")


def announce(banner: str, host: str, port: int, ready_file: str) -> None:
    """Tell the user (banner on stdout) and a supervisor (ready file) that the mesh serves."""
    sys.stdout.write(banner)
    sys.stdout.flush()
    if ready_file:
        Path(ready_file).write_text(f"{host} {port}\n")


async def run_local_mesh(options: LocalMeshOptions, stop: asyncio.Event) -> None:
    from mesh.gateway.runtime import GatewayRuntime, check_bind_is_safe, serve

    if options.nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    check_thread_counts(options.threads, options.decode_threads)
    if options.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {options.strategy!r} (choose from {', '.join(STRATEGIES)})")
    stage_count = options.stages or options.nodes
    if options.strategy == "pipeline" and stage_count > options.nodes:
        raise ConfigError(f"{stage_count} stages need at least {stage_count} nodes, not {options.nodes}")
    cluster_key = options.cluster_key or secrets.token_urlsafe(32)
    config = GatewayConfig(host=options.host, port=options.port, cluster_key=cluster_key,
                           api_key=options.api_key, model=options.model, policy=options.policy,
                           cloud_url=options.cloud_url, cloud_model=options.cloud_model,
                           cloud_key_env=options.cloud_key_env)
    check_bind_is_safe(config)
    model_path = await asyncio.to_thread(resolve, options.model)
    runtime = GatewayRuntime(replace(config, model=str(model_path)), model_path, timeouts=Timeouts())

    # Which node does what: explicit pipelines split evenly (or by --split) over the first
    # nodes; auto asks the planner, which also decides between replicas and pipelines.
    pipelines: list[list[tuple[int, LayerRange]]] = []
    replicas: set[int] = set()
    if options.strategy == "pipeline":
        ranges = split_layers(inspect_gguf(model_path).n_layers, stage_count, options.split)
        pipelines.append(list(enumerate(ranges)))
    elif options.strategy == "replica":
        replicas = set(range(options.nodes))
    else:
        planned, _ = await asyncio.to_thread(local_plan, model_path, options.nodes, options.memory_limit,
                                             options.n_ctx, "auto", options.stages)
        for reason in planned.reasons:
            log.info("plan: %s", reason)
        if not planned.feasible:
            raise ConfigError("no placement fits: " + "; ".join(planned.reasons[-2:]))
        # The planner may have shrunk the context and prefill chunks to fit the memory limit.
        options = replace(options, n_ctx=planned.n_ctx, prefill_chunk=planned.prefill_chunk)
        index_of = {NodeId(f"node-{i + 1}"): i for i in range(options.nodes)}
        for placement in planned.placements:
            if placement.kind == "replica":
                replicas.add(index_of[placement.stages[0].node_id])
            else:
                pipelines.append([(index_of[s.node_id], s.layers) for s in placement.stages])

    with tempfile.TemporaryDirectory(prefix="edgemesh-up-") as tmp:
        nodes = [spawn_node(i, model_path, options, cluster_key, Path(tmp), "replica" if i in replicas else "stage")
                 for i in range(options.nodes)]
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        gateway_stop = asyncio.Event()
        gateway = asyncio.create_task(serve(runtime, gateway_stop, on_listening=listening.set_result))
        try:
            await _wait_for_mesh(runtime, nodes, listening, gateway, stop)
            if stop.is_set():
                return
            for chain in pipelines:
                await load_pipeline(runtime, [(nodes[i].name, nodes[i].node_id(), layers) for i, layers in chain],
                                    options.n_ctx, options.slots, options.prefill_chunk)
            port = listening.result()
            announce(_banner(f"http://{options.host}:{port}", model_path.stem, len(nodes), options.api_key),
                     options.host, port, options.ready_file)
            await _supervise(nodes, gateway, stop)
        finally:
            log.info("stopping the local mesh")
            gateway_stop.set()
            await asyncio.to_thread(stop_nodes, nodes)
            await asyncio.gather(gateway, return_exceptions=True)


async def _wait_for_mesh(runtime: GatewayRuntime, nodes: list[NodeProcess], listening: asyncio.Future[int],
                         gateway: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Until the gateway listens and has every node READY (or stop/failure)."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    announced: set[str] = set()
    while not stop.is_set():
        if gateway.done():
            gateway.result()  # raises what stopped it
            raise ConfigError("the gateway stopped during start-up")
        for node in nodes:
            code = node.process.poll()
            if code is not None:
                raise ModelError(f"{node.name} exited with code {code} during start-up (see its log above)")
            peer = node.poll_ready()
            if peer is not None and peer.address not in announced and listening.done():
                announced.add(peer.address)
                runtime.add_peer(peer)
        if listening.done() and len(runtime.membership.ready()) >= len(nodes):
            return
        if time.monotonic() > deadline:
            raise ModelError(f"nodes were not ready after {NODE_START_TIMEOUT_S:.0f}s")
        await asyncio.sleep(0.1)


async def _supervise(nodes: list[NodeProcess], gateway: asyncio.Task[None], stop: asyncio.Event) -> None:
    reported: set[str] = set()
    while not stop.is_set():
        if gateway.done():
            gateway.result()
            return
        for node in nodes:
            code = node.process.poll()
            if code is not None and node.name not in reported:
                reported.add(node.name)
                log.warning("%s (pid %d) exited with code %d; the mesh goes on without it",
                            node.name, node.process.pid, code)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            pass


async def load_pipeline(runtime: GatewayRuntime, chain: list[tuple[str, NodeId, LayerRange]], n_ctx: int,
                        slots: int, prefill_chunk: int = 0) -> None:
    """Load one layer range per node (name, id, layers), then wait until the gateway routes
    to the pipeline they form. Nodes in no chain stay spare: a failed stage's layers go to them."""
    for index, (name, node_id, layers) in enumerate(chain):
        client = runtime.membership.client_for(node_id)
        if client is None:
            raise ModelError(f"{name} is not connected to the gateway")
        log.info("loading stage %d/%d: layers [%d, %d) on %s", index + 1, len(chain), layers.first,
                 layers.last_exclusive, name)
        await client.load_stage(runtime.model_sha, layers, n_ctx, slots, STAGE_LOAD_TIMEOUT_S, prefill_chunk)
    deadline = time.monotonic() + 30
    wanted = {node_id for _, node_id, _ in chain}
    while not any(p.kind == "pipeline" and set(p.node_ids) == wanted for p in runtime.scheduler.placements()):
        if time.monotonic() > deadline:
            raise ModelError("the stages were loaded but no complete pipeline formed")
        await runtime.membership.refresh()
        await asyncio.sleep(0.1)
    runtime.metrics.replans.labels("start").inc()


def local_plan(model_path: Path, nodes: int, memory_limit: str, n_ctx: int, strategy: str, stages: int,
               speeds: tuple[float, ...] = ()) -> tuple[Plan, dict[NodeId, str]]:
    """Plan N local nodes (named node-1..N, ids alike): each may use --memory-limit, or an
    equal share of free memory."""
    from mesh.config import parse_bytes
    from node.gguf import file_sha256
    from node.probe import memory
    from node.profile import model_profile

    limit = parse_bytes(memory_limit)
    budget = limit if limit else memory().free // max(nodes, 1)
    names = {NodeId(f"node-{i + 1}"): f"node-{i + 1}" for i in range(nodes)}
    peers = [PeerCapability(node_id, name, budget, speeds[i] if i < len(speeds) else 0.0)
             for i, (node_id, name) in enumerate(names.items())]
    profile = model_profile(model_path, file_sha256(model_path))
    return plan(peers, profile, Policy(n_ctx=n_ctx, strategy=strategy, stages=stages)), names
