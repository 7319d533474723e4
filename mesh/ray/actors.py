"""The node actor: one real EdgeMesh node inside a Ray actor process.

The node runs exactly as `edgemesh node` does (`run_node`), on its own asyncio loop in a
thread, so the gRPC server, the engines and the drain logic are the same code. The
constructor returns only once the node serves, so a node that cannot start (a missing
model, a bad flag) fails the actor's creation, which Ray does not retry; a node that
dies later takes the process with it, which Ray does restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mesh.config import NodeConfig
from mesh.logs import setup_logging
from mesh.ray import import_ray
from mesh.ready_file import read_node_ready

log = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # a slow device may take minutes to hash and load a big model

NodeAddress = tuple[str, int, int, str]  # (host, grpc_port, metrics_port, node_id)


@dataclass(frozen=True)
class NodeSpec:
    """What one actor serves. Ray keeps it with the actor and passes it again on every
    restart, so it holds the cluster key: whoever can read it can already run any code on
    the Ray cluster, so that discloses nothing they could not take anyway."""

    config: NodeConfig
    bind_node_ip: bool = False  # bind the Ray node's own IP (the gateway is on another machine)
    start_timeout_s: float = START_TIMEOUT_S


class NodeActor:
    """Wrapped with `ray.remote` by the launcher; a plain class so that it stays typed and
    importable without Ray."""

    def __init__(self, spec: NodeSpec) -> None:
        setup_logging(process=spec.config.name)
        host = _ray_node_ip() if spec.bind_node_ip else spec.config.host
        self._workdir = Path(tempfile.mkdtemp(prefix="edgemesh-ray-"))
        ready = self._workdir / "node.ready"
        # Ports are picked by the OS: several actors may share a Ray node, and Ray, not mDNS,
        # tells the gateway where each one listens.
        config = replace(spec.config, host=host, port=0, metrics_port=0, step_port=0, advertise=False,
                         ready_file=str(ready))
        self._name = config.name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._serving = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, args=(config,), name="edgemesh-node", daemon=True)
        self._thread.start()
        self._address = self._wait_ready(ready, spec.start_timeout_s)
        self._serving = True
        log.info("node actor %s ready at %s:%d (pid %d)", self._name, self._address[0], self._address[1],
                 os.getpid())

    def _serve(self, config: NodeConfig) -> None:
        from node.daemon import run_node

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            if self._stopping.is_set():
                self._stop.set()
            await run_node(config, self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            log.exception("node %s failed", self._name)
        if self._serving and not self._stopping.is_set():
            # A node that stops on its own is broken; ending the process is how Ray learns
            # of it, and Ray then restarts the actor as a fresh node.
            log.error("node %s stopped unexpectedly; exiting so that Ray restarts this actor", self._name)
            os._exit(1)

    def _wait_ready(self, ready: Path, timeout_s: float) -> NodeAddress:
        deadline = time.monotonic() + timeout_s
        while True:
            written = read_node_ready(ready)
            if written is not None:
                return written.host, written.port, written.metrics_port, written.node_id
            if not self._thread.is_alive():
                raise RuntimeError(f"node {self._name} could not start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop(10.0)
                raise RuntimeError(f"node {self._name} was not serving after {timeout_s:.0f}s")
            time.sleep(0.05)

    def address(self) -> NodeAddress:
        """Where the node serves: (host, grpc_port, metrics_port, node_id)."""
        return self._address

    def describe(self) -> dict[str, str | int]:
        """The address plus where the actor runs, for operators and tests."""
        ray = import_ray()
        host, port, metrics_port, node_id = self._address
        return {"name": self._name, "host": host, "grpc_port": port, "metrics_port": metrics_port,
                "node_id": node_id, "pid": os.getpid(), "ray_node_id": ray.get_runtime_context().get_node_id()}

    def stop(self, timeout_s: float) -> bool:
        """Drain and stop the node (in-flight streams finish first); True once it stopped.
        The process stays until the caller kills the actor."""
        self._stopping.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed in between: the node has already stopped
                pass
        self._thread.join(timeout_s)
        stopped = not self._thread.is_alive()
        if stopped:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return stopped


def _ray_node_ip() -> str:
    ray = import_ray()
    return str(ray.util.get_node_ip_address())
