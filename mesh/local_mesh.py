"""`edgemesh up`: N node processes and an in-process gateway on this machine.

It only starts processes: nodes are plain `edgemesh node` processes (role auto) on
ephemeral loopback ports, sharing a cluster key made for this mesh (so two local meshes
never adopt each other's nodes over mDNS), and the gateway's placement controller places
the model on them exactly as on real devices (mesh.placement.controller). The gateway
finds them by mDNS and, to be quick, also by the address each node writes to its ready
file; membership deduplicates by node id.
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
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.config import (
    GatewayConfig,
    Limits,
    Timeouts,
    UpConfig,
    check_ports_free,
    check_thread_counts,
    home_dir,
    parse_bytes,
)
from mesh.discovery import Peer
from mesh.errors import ConfigError, ModelError
from mesh.model_store import resolve
from mesh.placement.planner import STRATEGIES, ModelProfile, Policy, replica_bytes
from mesh.ready_file import GatewayReady, read_node_ready, write_ready
from mesh.settings import as_flags, env_names, shared
from mesh.types import NodeId
from node.compute import STAGE_OPENMP_ENV
from node.probe import default_threads, memory

if TYPE_CHECKING:
    from mesh.gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)

NODE_START_TIMEOUT_S = 300.0  # a slow device may take minutes to hash and load a big model
NODE_STOP_GRACE_S = 70.0  # a node drains for up to Timeouts.drain_s (60 s by default) before exiting
STOP_MARGIN_S = 10.0  # beyond a node's drain: its exit after the last stream
PLACEMENT_TIMEOUT_S = 300.0  # the controller loads the model on the nodes within this


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
        """Where the node serves, once it has written its ready file."""
        if self.peer is None:
            ready = read_node_ready(self.ready_file)
            if ready is not None:
                self.peer = Peer(address=ready.address, node_id=ready.node_id, metrics_port=ready.metrics_port)
        return self.peer


def threads_per_node(nodes: int, requested: int) -> int:
    """A fair share of this machine's cores for each replica node: replicas run at the same
    time. (Pipeline stages take turns and use every core; see spawn_node.)"""
    if requested > 0:
        return requested
    return max(1, (os.cpu_count() or 1) // nodes)


def asked_stages(strategy: str, stages: int, nodes: int) -> int:
    """The stage count a launcher asks the controller for: an explicit pipeline spans every
    node it starts unless told otherwise (said outright, so that a pipeline planned before
    all of them joined grows to that shape when they have)."""
    return stages or (nodes if strategy == "pipeline" else 0)


def expects_stages(profile: ModelProfile, strategy: str, memory_limit: str | int, n_ctx: int) -> bool:
    """Whether the nodes will most likely serve layer ranges (so each should use every core
    in its turn) rather than whole replicas side by side. Only sets threads: the placement is
    the controller's decision."""
    if strategy in ("pipeline", "replica"):
        return strategy == "pipeline"
    limit = parse_bytes(memory_limit)
    return bool(limit) and limit < replica_bytes(profile, Policy(n_ctx=n_ctx))


def node_environment(parent: Mapping[str, str], cluster_key: str, stages: bool) -> dict[str, str]:
    """The environment a node of `up` starts with. The key goes by environment, not argv, so
    `ps` does not show it. The timeouts and limits go as flags (what `up` resolved from its
    own flags and environment), and the parent's EDGEMESH_<FIELD> of those are left out: a
    node would read one where `up` passed no flag because its own flag set the default back,
    and then disagree with the gateway."""
    nested = env_names(Timeouts) | env_names(Limits)
    env = {name: value for name, value in parent.items() if name not in nested}
    env["EDGEMESH_CLUSTER_KEY"] = cluster_key
    if stages:
        for variable, value in STAGE_OPENMP_ENV.items():
            env.setdefault(variable, value)  # what the user set wins
    return env


def spawn_node(index: int, model_path: Path, options: UpConfig, cluster_key: str,
               workdir: Path, stages: bool) -> NodeProcess:
    name = f"node-{index + 1}"
    ready = workdir / f"{name}.ready"
    # Replicas run at once and share the cores; stages take turns, so each step of a stage,
    # prefill chunk or single token, uses every core.
    threads = (options.threads or default_threads()) if stages \
        else threads_per_node(options.nodes, options.threads)
    decode_threads = options.decode_threads or threads
    command = [
        sys.executable, "-m", "mesh.cli", "node", "--model", str(model_path), "--name", name,
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--step-port", "0",
        "--threads", str(threads),
        "--decode-threads", str(decode_threads),
        "--slots", str(options.slots), "--n-ctx", str(options.n_ctx),
        "--memory-limit", options.memory_limit, "--ready-file", str(ready),
        *(["--insecure-plaintext"] if options.insecure_plaintext else []),
        *[arg for sha in options.allowed_models for arg in ("--allow-model", sha)],
        *as_flags(options.timeouts), *as_flags(options.limits),  # the node's are the mesh's
    ]
    env = node_environment(os.environ, cluster_key, stages)
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


def _banner(url: str, model_name: str, nodes: int, api_key: str, placement: list[str],
            key_file: Path | None) -> str:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    placed = "".join(f"            {line}\n" for line in placement)
    key_source = f'"$(cat {key_file})"' if key_file else "<the cluster key you gave>"
    return (
        f"\nEdgeMesh is up: {nodes} node(s) serving {model_name}\n"
        f"  placed:\n{placed}"
        f"  web page: {url}/\n"
        f"  API:      {url}/v1\n"
        f"  metrics:  {url}/metrics\n"
        f"  try:      curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        "              -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 64}'\n"
        f"  join:     on another device of this LAN (the gateway must listen there too: `up --host ...`)\n"
        f"            EDGEMESH_CLUSTER_KEY={key_source} edgemesh node --host 0.0.0.0 --model default\n"
        "  stop:     Ctrl-C\n\n")


def announce(banner: str, host: str, port: int, ready_file: str) -> None:
    """Tell the user (banner on stdout) and a supervisor (ready file) that the mesh serves."""
    sys.stdout.write(banner)
    sys.stdout.flush()
    if ready_file:
        write_ready(ready_file, GatewayReady(host, port))


def write_cluster_key(key: str) -> Path:
    """The mesh's fresh key in a private file of this run (removed when it stops), so the
    banner can say how a real device joins."""
    path = home_dir() / f"up-{os.getpid()}.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path


async def run_local_mesh(options: UpConfig, stop: asyncio.Event) -> None:
    from mesh.gateway.runtime import GatewayRuntime, check_bind_is_safe

    if options.nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    check_thread_counts(options.threads, options.decode_threads)
    if options.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {options.strategy!r} (choose from {', '.join(STRATEGIES)})")
    if options.stages < 0:
        raise ConfigError(f"--stages must be 0 (automatic) or a positive count, not {options.stages}")
    if options.strategy == "pipeline" and options.stages > options.nodes:
        raise ConfigError(f"{options.stages} stages need at least {options.stages} nodes, not {options.nodes}")
    # The gateway listens only once the nodes run: a port taken now must fail before any of them starts.
    check_ports_free(options.host, (("--port", options.port),))
    cluster_key = options.cluster_key or secrets.token_urlsafe(32)
    model_path = await asyncio.to_thread(resolve, options.model)
    # The launcher writes its ready file itself, once every node is up, not the gateway when it listens.
    config = GatewayConfig(**{**shared(options, GatewayConfig), "cluster_key": cluster_key, "model": str(model_path),
                              "stages": asked_stages(options.strategy, options.stages, options.nodes),
                              "ready_file": ""})
    check_bind_is_safe(config)
    runtime = GatewayRuntime(config, model_path)
    if not parse_bytes(options.memory_limit):
        # The nodes share this machine: each may use an equal share of what is free (each
        # would otherwise report all of it, and the planner would count it N times).
        options = replace(options, memory_limit=str(memory().free // options.nodes))
    stages = expects_stages(runtime.controller.profile, options.strategy, options.memory_limit, options.n_ctx)
    key_file = None if options.cluster_key else await asyncio.to_thread(write_cluster_key, cluster_key)
    try:
        with tempfile.TemporaryDirectory(prefix="edgemesh-up-") as tmp:
            await _run_started_mesh(runtime, options, model_path, cluster_key, Path(tmp), stages, key_file, stop)
    finally:
        if key_file is not None:
            key_file.unlink(missing_ok=True)


async def _run_started_mesh(runtime: GatewayRuntime, options: UpConfig, model_path: Path,
                            cluster_key: str, workdir: Path, stages: bool, key_file: Path | None,
                            stop: asyncio.Event) -> None:
    """Start the nodes and the gateway, serve until `stop`, and stop every process started
    here whatever fails on the way (a node that cannot start, the gateway, a signal), so that
    `up` never leaves a node running after it has gone."""
    from mesh.gateway.server import serve

    nodes: list[NodeProcess] = []
    gateway: asyncio.Task[None] | None = None
    gateway_stop = asyncio.Event()
    try:
        for i in range(options.nodes):
            nodes.append(spawn_node(i, model_path, options, cluster_key, workdir, stages))
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        gateway = asyncio.create_task(serve(runtime, gateway_stop, on_listening=listening.set_result))
        await _wait_for_mesh(runtime, nodes, listening, gateway, stop)
        if stop.is_set():
            return
        await wait_for_placement(runtime, gateway, stop)
        if stop.is_set():
            return
        port = listening.result()
        placement = runtime.controller.describe(runtime.scheduler.placements())
        announce(_banner(f"http://{options.host}:{port}", model_path.stem, len(nodes), options.api_key,
                         placement, key_file), options.host, port, options.ready_file)
        await _supervise(nodes, gateway, stop)
    finally:
        log.info("stopping the local mesh")
        gateway_stop.set()
        await asyncio.to_thread(stop_nodes, nodes, options.timeouts.drain_s + STOP_MARGIN_S)
        if gateway is not None:
            await asyncio.gather(gateway, return_exceptions=True)


async def wait_for_placement(runtime: GatewayRuntime, gateway: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Until the controller has placed the model on the nodes (what real devices see too)."""
    deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
    await runtime.membership.refresh()
    await runtime.controller.round()  # a round that sees every node, not one from before the last joined
    while not stop.is_set():
        if gateway.done():
            gateway.result()
            raise ConfigError("the gateway stopped during start-up")
        decision = runtime.controller.decision
        if runtime.controller.converged and decision is not None and decision.placements \
                and runtime.scheduler.placements():
            return
        if decision is not None and not decision.plan.feasible and decision.change == "none":
            raise ConfigError("no placement fits: " + "; ".join(decision.plan.reasons[-2:]))
        if time.monotonic() > deadline:
            raise ModelError(f"the model was not placed within {PLACEMENT_TIMEOUT_S:.0f}s")
        await asyncio.sleep(0.1)


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
