"""`edgemesh ray up` and `edgemesh ray down`.

`ray up` connects to a Ray cluster as a driver, starts one named, detached node actor per
node (pinned round-robin to the Ray nodes, restarted by Ray when its process dies), and
serves the gateway in its own process, as `edgemesh up` does, finding the nodes through
Ray instead of mDNS. The gateway's placement controller places the model on the actors'
nodes, as on any mesh. On Ctrl-C it
drains and removes its actors; `ray down` does the same from anywhere (for instance after
the `ray up` process itself was lost), since the actors are found by name.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import GatewayConfig, NodeConfig, RayUpConfig, parse_bytes
from mesh.discovery import parse_host_port
from mesh.errors import ConfigError, ModelError
from mesh.local_mesh import (
    NODE_START_TIMEOUT_S,
    NODE_STOP_GRACE_S,
    STOP_MARGIN_S,
    announce,
    asked_stages,
    expects_stages,
    wait_for_placement,
)
from mesh.model_store import resolve
from mesh.placement.planner import STRATEGIES
from mesh.ray import ACTOR_PREFIX, actor_name, import_ray
from mesh.ray.actors import NodeActor, NodeSpec
from mesh.ray.placement import Slot, alive_nodes, assign_slots
from mesh.ray.watch import RayNodeWatch
from mesh.settings import shared
from node.compute import STAGE_OPENMP_ENV

if TYPE_CHECKING:
    from mesh.gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)

ACTOR_CONCURRENCY = 4  # address/describe must answer while stop() waits for a drain
CONNECT_CHECK_S = 5.0
# Ray (measured on 2.60) ignores a soft node affinity for an actor that reserves no
# resources at all and scatters such actors at random; a token CPU share keeps the pinning.
MIN_ACTOR_CPUS = 0.01


def connect(address: str, namespace: str) -> Any:
    """ray.init as a driver of an existing cluster, quietly; returns the ray module."""
    ray = import_ray()
    _check_reachable(address)
    # Our own log format everywhere; Ray's INFO lines (connecting, session dirs) are noise here.
    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.init(address=address, namespace=namespace, configure_logging=False, log_to_driver=True)
    return ray


def _check_reachable(address: str) -> None:
    """Fail at once on a head that does not answer: ray.init would retry for minutes."""
    if address == "auto" or "://" in address:
        return  # found by ray.init itself, or a Ray Client address
    host, port = parse_host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_CHECK_S).close()
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head` "
                          "or pass the --address of its head") from None


def our_actors(ray: Any) -> list[str]:
    return sorted(n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX))


def stop_actors(ray: Any, handles: dict[str, Any], grace_s: float = NODE_STOP_GRACE_S) -> None:
    """Drain every node (in-flight streams finish), then kill the actors for good so that
    Ray does not restart them."""
    refs = [h.stop.remote(grace_s) for h in handles.values()]
    if refs:
        _, late = ray.wait(refs, num_returns=len(refs), timeout=grace_s + 5)
        if late:
            log.warning("%d node(s) did not drain in %.0fs; killing them", len(late), grace_s)
    for name, handle in handles.items():
        ray.kill(handle, no_restart=True)
        log.info("removed node actor %s", name)


def ray_down(address: str, namespace: str, grace_s: float = NODE_STOP_GRACE_S) -> list[str]:
    """Stop and remove the node actors of a namespace; returns their names."""
    ray = connect(address, namespace)
    try:
        handles = {}
        for name in our_actors(ray):
            try:
                handles[name] = ray.get_actor(name)
            except ValueError:  # it died between listing and lookup: nothing left to stop
                continue
        stop_actors(ray, handles, grace_s)
        return list(handles)
    finally:
        ray.shutdown()


def _node_bind(options: RayUpConfig, slots: list[Slot], gateway_ip: str) -> tuple[str, bool]:
    """The address nodes bind: loopback while the whole mesh is on this machine (every
    listener binds loopback unless it must not), the Ray node's own IP otherwise."""
    if options.node_host == "auto":
        if all(s.ray_node.ip == gateway_ip for s in slots):
            return "127.0.0.1", False
        return "", True
    if options.node_host == "ray":
        return "", True
    return options.node_host, False


def start_actors(ray: Any, slots: list[Slot], stages: bool, options: RayUpConfig, model: str,
                 cluster_key: str, gateway_ip: str) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    host, bind_node_ip = _node_bind(options, slots, gateway_ip)
    remote_class = ray.remote(NodeActor)
    handles: dict[str, Any] = {}
    for slot in slots:
        config = NodeConfig(model=model, name=slot.name, host=host or "127.0.0.1", threads=slot.threads,
                            decode_threads=options.decode_threads or slot.threads,
                            memory_limit=str(slot.memory_budget), cluster_key=cluster_key, slots=options.slots,
                            n_ctx=options.n_ctx, advertise=False, timeouts=options.timeouts, limits=options.limits)
        # Stages take turns on each token; an idle stage's OpenMP workers must hand the cores
        # over to the busy stage on the same machine (see node.compute).
        env = dict(STAGE_OPENMP_ENV) if stages else {}
        name = actor_name(slot.index)
        handles[name] = remote_class.options(
            name=name, namespace=options.namespace, lifetime="detached", max_restarts=options.max_restarts,
            # address/describe/stop are idempotent, so a call made while Ray restarts the
            # actor simply waits for the new process instead of failing.
            max_task_retries=-1, max_concurrency=ACTOR_CONCURRENCY,
            num_cpus=max(options.node_cpus, MIN_ACTOR_CPUS),
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.ray_node.node_id, soft=True),
            runtime_env={"env_vars": env},
        ).remote(NodeSpec(config, bind_node_ip=bind_node_ip, start_timeout_s=NODE_START_TIMEOUT_S))
        log.info("started node actor %s on Ray node %s (%s)", name, slot.ray_node.node_id[:12], slot.ray_node.ip)
    return handles


def _check(options: RayUpConfig) -> None:
    if options.nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    if options.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {options.strategy!r} (choose from {', '.join(STRATEGIES)})")
    if options.strategy == "pipeline" and options.stages > options.nodes:
        raise ConfigError(f"{options.stages} stages need at least {options.stages} nodes, not {options.nodes}")


async def run_ray_mesh(options: RayUpConfig, stop: asyncio.Event) -> None:
    from mesh.gateway.runtime import GatewayRuntime, check_bind_is_safe

    _check(options)
    cluster_key = options.cluster_key or secrets.token_urlsafe(32)
    # The launcher writes its ready file itself, once every actor is up, not the gateway when it listens.
    config = GatewayConfig(**{**shared(options, GatewayConfig), "cluster_key": cluster_key, "discovery": False,
                              "stages": asked_stages(options.strategy, options.stages, options.nodes),
                              "ready_file": ""})
    check_bind_is_safe(config)  # before anything slow or anything on the cluster
    ray = connect(options.address, options.namespace)
    # ray.init replaces the SIGTERM handler with sys.exit; give it back to the stop event
    # so that SIGTERM drains the mesh like Ctrl-C does.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        existing = our_actors(ray)
        if existing:
            raise ConfigError(f"namespace {options.namespace!r} already runs {', '.join(existing)}: stop them with "
                              f"`edgemesh ray down --namespace {options.namespace}`, or pick another --namespace")
        model_path = await asyncio.to_thread(resolve, options.model)
        runtime = GatewayRuntime(replace(config, model=str(model_path)), model_path)
        slots = assign_slots(alive_nodes(ray.nodes()), options.nodes, options.threads,
                             parse_bytes(options.memory_limit))
        stages = expects_stages(runtime.controller.profile, options.strategy, min(s.memory_budget for s in slots),
                                options.n_ctx)
        # A model given as a path here is the same path on every Ray node (a shared or
        # copied file); 'default' and cached names resolve in each node's own cache.
        model = str(model_path) if Path(options.model).expanduser().is_file() else options.model
        handles = start_actors(ray, slots, stages, options, model, cluster_key, str(ray.util.get_node_ip_address()))
        watch = RayNodeWatch(ray, handles, runtime.add_peer,
                             on_gone=lambda address: _forget_later(runtime, address))
        try:
            await _serve_mesh(runtime, watch, slots, options, stop)
        finally:
            log.info("stopping the Ray mesh")
            left = {name: h for name, h in handles.items() if name not in watch.gone}
            await asyncio.to_thread(stop_actors, ray, left, options.timeouts.drain_s + STOP_MARGIN_S)
    finally:
        ray.shutdown()


async def _serve_mesh(runtime: GatewayRuntime, watch: RayNodeWatch, slots: list[Slot],
                      options: RayUpConfig, stop: asyncio.Event) -> None:
    from mesh.gateway.server import serve

    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    gateway_stop = asyncio.Event()
    gateway = asyncio.create_task(serve(runtime, gateway_stop, on_listening=listening.set_result))
    watching: asyncio.Task[None] | None = None
    try:
        while not listening.done():
            if gateway.done():
                gateway.result()
                raise ConfigError("the gateway stopped during start-up")
            await asyncio.sleep(0.05)
        watching = asyncio.create_task(watch.run())
        if not await _wait_for_nodes(runtime, watch, gateway, stop):
            return
        await wait_for_placement(runtime, gateway, stop)
        if stop.is_set():
            return
        port = listening.result()
        announce(_banner(f"http://{options.host}:{port}", runtime.model_name, len(slots), options.namespace),
                 options.host, port, options.ready_file)
        await _supervise(watch, gateway, stop)
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        gateway_stop.set()
        await asyncio.gather(gateway, return_exceptions=True)


async def _wait_for_nodes(runtime: GatewayRuntime, watch: RayNodeWatch, gateway: asyncio.Task[None],
                          stop: asyncio.Event) -> bool:
    """Until the current node of every actor is READY in membership (False: stopped first)."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while not stop.is_set():
        if gateway.done():
            gateway.result()
            raise ConfigError("the gateway stopped during start-up")
        if watch.gone:
            name, why = next(iter(watch.gone.items()))
            raise ModelError(f"node actor {name} could not start: {why}")
        ready = {m.node_id for m in runtime.membership.ready()}
        if all(watch.node_id(name) in ready for name in watch.names()):
            return True
        if time.monotonic() > deadline:
            raise ModelError(f"the node actors were not ready after {NODE_START_TIMEOUT_S:.0f}s")
        await asyncio.sleep(0.1)
    return False


async def _supervise(watch: RayNodeWatch, gateway: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Serve until stopped, the gateway fails, or every actor is gone (`ray down` elsewhere)."""
    reported: set[str] = set()
    while not stop.is_set():
        if gateway.done():
            gateway.result()
            return
        if len(watch.gone) == len(watch.names()):
            log.warning("every node actor is gone (stopped by `edgemesh ray down`?); stopping the gateway")
            return
        for name, why in watch.gone.items():
            if name not in reported:
                reported.add(name)
                log.warning("node actor %s is gone for good (%s); the mesh goes on without it", name, why)
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            pass


def _banner(url: str, model_name: str, nodes: int, namespace: str) -> str:
    return (
        f"\nEdgeMesh is up on Ray: {nodes} node actor(s) serving {model_name} (namespace {namespace})\n"
        f"  API:      {url}/v1\n"
        f"  metrics:  {url}/metrics\n"
        f"  nodes:    {url}/api/cluster\n"
        f"  stop:     Ctrl-C here, or `edgemesh ray down --namespace {namespace}`\n\n")


def _forget_later(runtime: GatewayRuntime, address: str) -> None:
    """The watch reports from sync code on the event loop; forgetting awaits a watcher's end."""
    task = asyncio.get_running_loop().create_task(runtime.membership.forget(address))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()  # keeps fire-and-forget tasks referenced until done
