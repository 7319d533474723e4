"""Discovery on Ray: the gateway asks each named node actor where its node serves.

This replaces mDNS for a Ray mesh. Every second each actor is asked `address()`; a call
to an actor that Ray is restarting waits for the new process (the actor's tasks are
retried), so a restarted actor, which is a new node with a new id and address, is found
as soon as it serves. Each new address goes to membership, which checks it over
authenticated gRPC like any peer; liveness stays gRPC's job, not Ray's. An actor Ray gave
up on (killed by `ray down`, or its node could not start) is reported gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from mesh.discovery import Peer
from mesh.ray.actors import NodeAddress
from mesh.types import NodeId

log = logging.getLogger(__name__)

POLL_S = 1.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the names in its error reports


class RayNodeWatch:
    def __init__(self, ray: Any, handles: dict[str, Any], on_peer: Callable[[Peer], None],
                 poll_s: float = POLL_S, on_gone: Callable[[str], None] | None = None) -> None:
        self._ray = ray
        self._handles = handles
        self._on_peer = on_peer
        self._on_gone = on_gone
        self._poll_s = poll_s
        self._pending: dict[str, concurrent.futures.Future[Any]] = {}
        self._asked_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.addresses: dict[str, NodeAddress] = {}  # actor name -> where its current node serves
        self.restarts: dict[str, int] = {}  # actor name -> new nodes seen after the first
        self.gone: dict[str, str] = {}  # actor name -> why Ray gave up on it

    def node_id(self, name: str) -> NodeId | None:
        address = self.addresses.get(name)
        return NodeId(address[3]) if address else None

    def names(self) -> list[str]:
        return list(self._handles)

    async def run(self) -> None:
        """Poll until cancelled; an answer is taken as soon as it arrives, a question asked
        at most once per poll interval per actor."""
        self._loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            self.poll()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_s)
            except asyncio.TimeoutError:
                pass

    def poll(self) -> None:
        now = time.monotonic()
        for name, handle in self._handles.items():
            if name in self.gone:
                continue
            future = self._pending.get(name)
            if future is not None:
                if not future.done():
                    continue  # still waiting, e.g. for a restarting actor
                del self._pending[name]
                self._take(name, future)
                if name in self.gone:
                    continue
            if now - self._asked_at.get(name, -self._poll_s) >= self._poll_s:
                self._asked_at[name] = now
                self._pending[name] = future = handle.address.remote().future()
                future.add_done_callback(self._answered)

    def _answered(self, _future: concurrent.futures.Future[Any]) -> None:
        """Runs on a Ray thread: wake the poll loop instead of waiting for its next tick."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop closed in between: nobody is waiting any more
                pass

    def _take(self, name: str, future: concurrent.futures.Future[Any]) -> None:
        exceptions = self._ray.exceptions
        try:
            host, port, metrics_port, node_id = future.result()
        except exceptions.ActorDiedError as exc:
            # Final: with unlimited task retries, a call fails only once Ray stops restarting.
            self.gone[name] = _why(exc)
            log.warning("node actor %s is gone: %s", name, self.gone[name])
            return
        except exceptions.RayError as exc:
            log.debug("asking %s for its address failed (%s); asking again", name, exc)
            return
        address: NodeAddress = (str(host), int(port), int(metrics_port), str(node_id))
        old = self.addresses.get(name)
        if address == old:
            return
        self.addresses[name] = address
        if old is None:
            log.info("node actor %s serves on %s:%d (node %s)", name, host, port, node_id)
        else:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            log.warning("node actor %s restarted: node %s on %s:%d replaces node %s", name, node_id, host, port,
                        old[3])
        grpc_host = f"[{host}]" if ":" in str(host) else str(host)
        if old is not None and self._on_gone is not None:
            old_host = f"[{old[0]}]" if ":" in old[0] else old[0]
            self._on_gone(f"{old_host}:{old[1]}")  # the restarted actor replaced that node for good
        self._on_peer(Peer(address=f"{grpc_host}:{port}", node_id=NodeId(str(node_id)),
                           metrics_port=int(metrics_port), source="ray"))


def _why(exc: Exception) -> str:
    """The line of Ray's long death report that says why: the constructor's own error when
    the node could not start, else Ray's reason (killed, out of restarts, node lost)."""
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if lines and "creation task" in lines[0]:
        return lines[-1]
    return next((line for line in lines if "because" in line), lines[0] if lines else type(exc).__name__)
