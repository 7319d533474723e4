"""Node process lifecycle: load, serve gRPC + metrics, advertise, drain on SIGTERM.

Draining means: health turns NOT_SERVING and Info says draining (so gateways stop
sending new work at once), the mDNS goodbye goes out, in-flight streams run to their
end (bounded by Timeouts.drain_s), and only then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path

from prometheus_client import CollectorRegistry

from mesh import __version__
from mesh.allowed_models import AllowedModels
from mesh.config import NodeConfig, check_ports_free, default_node_name, parse_bytes, resolve_cluster_key
from mesh.discovery import Advertisement, Advertiser
from mesh.errors import CapacityExhausted, ConfigError, EdgeMeshError
from mesh.metrics import NodeMetrics
from mesh.model_store import ProgressLog, resolve
from mesh.placement.planner import slots_for_budget
from mesh.ready_file import NodeReady, write_ready
from mesh.template_check import check_model_templates
from mesh.transport import tls
from mesh.transport.auth import cluster_hash
from mesh.transport.generated import edgemesh_pb2_grpc as pb_grpc
from mesh.transport.server import HealthState, bind, make_server
from mesh.types import ModelHeld, ModelSha, NodeId
from node import gguf, probe
from node.activity import Activity
from node.budget import MemoryBudget
from node.claims import ClaimTable
from node.compute import ComputeThread
from node.metrics_server import start_metrics_server
from node.pipeline_head import PeerLinks, PipelineHead
from node.profile import model_profile
from node.replica_host import ReplicaHost
from node.service import Holdings, NodeIdentity, NodeService, NodeState
from node.shard_source import ShardPeers, shard_file_from_peers
from node.speed import SpeedMeter
from node.stage_host import LocalFile, StageHost
from node.step_server import StepServer

log = logging.getLogger(__name__)


# auto: the gateway's placement controller decides (replica, stage or spare); stage: layer
# ranges only, never a whole replica; replica: also load the whole model at start.
ROLES = ("auto", "stage", "replica")


def describe_file(path: Path, n_ctx: int) -> ModelHeld:
    summary = gguf.inspect(path)
    log.info("model %s: %s, %d layers, %.1f MB", path.name, summary.architecture, summary.n_layers,
             summary.file_bytes / 1e6)
    progress = ProgressLog()
    sha = gguf.file_sha256(path, lambda done, total: progress(f"hashing {path.name}", done, total))
    return ModelHeld(name=path.stem, sha256=ModelSha(sha), n_layers=summary.n_layers,
                     file_bytes=summary.file_bytes, n_ctx=n_ctx, architecture=summary.architecture,
                     n_vocab=summary.n_vocab)


async def keep_speed_current(meter: SpeedMeter, compute: ComputeThread, model_path: Path, n_layers: int,
                             threads: int) -> None:
    """Re-probe the decode speed whenever it is due and the node is idle (see node.speed).
    Each window is its own compute call, with the pauses between them off the compute
    thread; real work arriving meanwhile cancels the probe (it is tried again later)."""
    started_at = time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        if not meter.probe_due(started_at):
            continue
        try:
            session = await asyncio.wrap_future(compute.call(partial(probe.DecodeProbe, model_path, n_layers)))
        except EdgeMeshError as exc:
            log.info("re-probe failed (%s); keeping %.1f tok/s", exc, meter.tokens_per_second)
            return
        windows: list[float] = []
        try:
            for _ in range(probe.PROBE_WINDOWS):
                if not meter.idle():
                    break
                windows.append(await asyncio.wrap_future(compute.call(session.window)))
                await asyncio.sleep(probe.PROBE_GAP_S)
        finally:
            await asyncio.wrap_future(compute.call(session.close))
        if len(windows) < probe.PROBE_WINDOWS or not meter.idle():
            meter.postpone()  # real work came: measure another time
            continue
        speed = session.tokens_per_second(windows, threads)
        if abs(speed - meter.tokens_per_second) > 0.2 * meter.tokens_per_second:
            log.info("probe: now about %.1f decode tokens/s (was %.1f)", speed, meter.tokens_per_second)
        meter.record_probe(speed)


def auto_slots(local: LocalFile, n_ctx: int, budget: MemoryBudget, stage_only: bool) -> int:
    """--slots 0: as many streams as a replica of the node's file holds in its budget."""
    if stage_only or local.shards is not None:
        return 1  # never a replica: its streams are a pipeline's sessions (see NodeIdentity)
    try:
        profile = model_profile(local.path, local.model.sha256)
    except EdgeMeshError as exc:  # a header the planner cannot read: the load will say why
        log.info("slots: 1 (%s)", exc)
        return 1
    total = budget.total()  # one reading of free memory: the number logged is the one used
    slots = slots_for_budget(profile, n_ctx, total)
    log.info("slots: %d streams at once fit %.0f MiB (--slots sets another number)", slots, total / 2**20)
    return slots


def export_holdings(metrics: NodeMetrics, holdings: Holdings) -> None:
    """Role and layer gauges read what the node holds at scrape time, so they never go stale."""
    metrics.role.labels("replica").set_function(lambda: 1 if holdings.replica.model is not None else 0)
    metrics.role.labels("stage").set_function(lambda: 1 if holdings.stages.held() else 0)
    metrics.layers_held.set_function(
        lambda: holdings.replica.layers + holdings.stages.layers_loaded())


async def run_node(config: NodeConfig, stop: asyncio.Event) -> None:
    timeouts, limits = config.timeouts, config.limits  # from flags or EDGEMESH_<FIELD>, as every setting
    cluster_key = resolve_cluster_key(config.cluster_key)
    threads = config.threads or probe.default_threads()
    identity = NodeIdentity(
        node_id=NodeId(uuid.uuid4().hex[:16]), name=config.name or default_node_name(), threads=threads,
        memory_limit=parse_bytes(config.memory_limit), slots=config.slots, max_queue=config.max_queue,
        stage_only=config.role == "stage", allowed=AllowedModels(config.allowed_models),
        stage_sessions=max(1, config.slots))

    if config.role not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, not {config.role!r}")
    if config.slots < 0:
        raise ConfigError(f"--slots must be 0 (as many as the memory budget holds) or more, not {config.slots}")
    if not -1 <= config.step_port <= 65535:
        raise ConfigError(f"--step-port must be a port, 0 (a free one) or -1 (off), not {config.step_port}")
    # Before anything calls a peer (--model-from-peers does): this process's certificate.
    tls.use_plaintext(config.host, config.insecure_plaintext)
    credentials = None if config.insecure_plaintext else tls.establish_node(cluster_key, identity.node_id)
    # Before the slow parts (hashing, the probe): a taken port is a one-line error at once.
    check_ports_free(config.host, (("--port", config.port), ("--metrics-port", config.metrics_port),
                                   ("--step-port", config.step_port)))
    if config.model_from_peers:
        local = await shard_file_from_peers(config, cluster_key, timeouts, limits)
    else:
        path = await asyncio.to_thread(resolve, config.model)
        local = LocalFile(path, await asyncio.to_thread(describe_file, path, config.n_ctx))
        # A hostile chat template refuses the model at once, not when llama.cpp would compile it.
        await asyncio.to_thread(check_model_templates, path, limits.template_max_source_bytes)
    model_path, model = local.path, local.model
    identity.allowed.check(model.sha256, f"--model {model_path}")  # (a --model-from-peers copy is allowed already)
    if identity.allowed.restricted:
        log.info("approved models (--allow-model): %s", identity.allowed.describe())
    budget = MemoryBudget(identity.memory_limit)
    if not config.slots:
        identity = replace(identity, slots=await asyncio.to_thread(
            auto_slots, local, config.n_ctx, budget, identity.stage_only))
    activity = Activity()
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    compute = ComputeThread()
    replica = ReplicaHost(local, n_ctx=config.n_ctx, threads=threads, slots=identity.slots, budget=budget,
                          stage_only=identity.stage_only, activity=activity, compute=compute,
                          on_decode_step=metrics.decode_batch_rows.observe)
    if config.role == "replica":
        try:
            await asyncio.to_thread(replica.load, model.sha256)
        except CapacityExhausted as exc:
            compute.close()
            raise ConfigError(f"--role replica: {exc}; raise --memory-limit or drop --role replica "
                              "(the gateway then plans this node as a pipeline stage)") from None
        except BaseException:
            compute.close()
            raise
    try:
        speed = await asyncio.wrap_future(compute.call(
            partial(probe.measure_decode_speed, model_path, model.n_layers, threads)))
        log.info("probe: about %.1f decode tokens/s on the whole model with %d thread(s)", speed, threads)
    except EdgeMeshError as exc:  # an architecture the stage engine does not run: no speed to offer
        log.info("probe: decode speed not measured (%s)", exc)
        speed = 0.0

    metrics.info.labels(identity.node_id, identity.name, __version__).set(1)
    mem = probe.memory()
    metrics.memory.labels("total").set(mem.total)
    metrics.memory.labels("free").set(mem.free)
    metrics.memory.labels("limit").set(identity.memory_limit)
    metrics_server = start_metrics_server(config.host, config.metrics_port, registry, timeouts, limits)
    metrics_port = int(metrics_server.server_port)

    state = NodeState()
    health = HealthState()
    meter = SpeedMeter(speed)
    shard_peers = ShardPeers(cluster_key, timeouts, limits)
    stages = StageHost([local], threads, metrics, config.decode_threads, budget, meter, activity,
                       connect=shard_peers.connect)
    holdings = Holdings(replica=replica, stages=stages, budget=budget, claims=ClaimTable(), speed=meter)
    export_holdings(metrics, holdings)
    peers = PeerLinks(cluster_key, timeouts, limits)
    head = PipelineHead(identity.node_id, stages, compute, peers, metrics.count_hidden_sent)
    service = NodeService(identity, holdings, metrics, state, cluster_key, compute, head)
    server = make_server(cluster_key, timeouts, limits, health, on_reject=lambda _m: metrics.auth_failures.inc())
    pb_grpc.add_NodeServicer_to_server(service, server)
    try:
        port = bind(server, config.host, config.port, credentials)
    except (RuntimeError, OSError) as exc:  # taken since the check above; grpc says only "failed to bind"
        raise ConfigError(f"cannot listen on {config.host}:{config.port} (--port): {exc}; choose another "
                          "--port, or 0 for a free one") from None
    state.grpc_port, state.metrics_port = port, metrics_port
    step_server = None
    if config.step_port >= 0:
        loop = asyncio.get_running_loop()
        step_server = StepServer(
            identity.node_id, cluster_key, credentials, stages, compute, metrics, timeouts, limits,
            draining=lambda: state.draining, on_open=partial(loop.call_soon_threadsafe, service.enter),
            on_close=partial(loop.call_soon_threadsafe, service.leave))
        state.step_port = step_server.start(config.host, config.step_port)
    await server.start()
    await health.set(True)
    metrics.up.set(1)

    advertiser = None
    if config.advertise:
        advertiser = Advertiser(Advertisement(identity.node_id, identity.name, cluster_hash(cluster_key),
                                              port, metrics_port), config.host)
        await advertiser.start()
    log.info("node %s (%s) with %s (%s) on %s:%d, step socket on :%d, metrics on :%d, pid %d", identity.name,
             identity.node_id, model.name, "replica" if replica.model else "roles from the gateway",
             config.host, port, state.step_port, metrics_port, os.getpid())
    if config.ready_file:
        write_ready(config.ready_file, NodeReady(config.host, port, metrics_port, identity.node_id))

    reprobing = asyncio.create_task(keep_speed_current(meter, compute, model_path, model.n_layers, threads)) \
        if speed > 0 else None
    try:
        await stop.wait()
    finally:
        if reprobing is not None:
            reprobing.cancel()
            await asyncio.gather(reprobing, return_exceptions=True)
        log.info("draining: %d request(s) in flight", state.in_flight)
        state.draining = True
        metrics.up.set(0)
        await health.set(False)
        if advertiser is not None:
            await advertiser.stop()
        if not await service.wait_idle(timeouts.drain_s):
            log.warning("drain timed out after %.0fs; %d request(s) cut", timeouts.drain_s, state.in_flight)
        # Stopping cancels open health Watch streams, which grpc logs as an unhandled
        # CancelledError although nothing is wrong; the drain above already ended real work.
        logging.getLogger("grpc._cython.cygrpc").setLevel(logging.CRITICAL)
        await server.stop(grace=2.0)
        if step_server is not None:
            await asyncio.to_thread(step_server.close)
        await peers.close()
        await shard_peers.close()
        compute.close()
        service.shutdown()
        metrics_server.shutdown()
        log.info("node %s stopped", identity.name)
