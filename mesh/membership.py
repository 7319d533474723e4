"""Who is in the mesh and whether they are alive.

Discovery hands us addresses; for each one a watcher task asks Info over authenticated
gRPC, then follows the node's standard health Watch stream (plus periodic Info refresh).
A broken stream or failed Info marks the node down at once; keepalive on the channel
bounds how long a silent peer can look alive. mDNS records are never liveness.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh import PROTOCOL_VERSION
from mesh.config import Limits, Timeouts
from mesh.discovery import Peer
from mesh.errors import EdgeMeshError, Unauthenticated
from mesh.transport.channels import NodeClient
from mesh.types import NodeId, NodeInfo

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5  # first reconnect delay after a failure; doubles up to RETRY_MAX_S
RETRY_MAX_S = 10.0
UNAUTHENTICATED_RETRY_S = 30.0  # a node with another key rarely changes its mind quickly


class MemberState(str, enum.Enum):
    JOINING = "joining"
    READY = "ready"
    DRAINING = "draining"
    DOWN = "down"
    UNAUTHENTICATED = "unauthenticated"
    INCOMPATIBLE = "incompatible"


@dataclass(frozen=True)
class Member:
    address: str
    state: MemberState
    since: float  # time.time() of the last state change
    info: NodeInfo | None
    source: str
    reason: str = ""

    @property
    def node_id(self) -> NodeId | None:
        return self.info.node_id if self.info else None


class _Watcher:
    def __init__(self, owner: Membership, peer: Peer) -> None:
        self.owner = owner
        self.peer = peer
        # Any node of the cluster, not the node id mDNS named: a node restarted at this address
        # has a new id, and Info's proof (node_proof) authenticates whichever id answers.
        self.client = NodeClient(peer.address, owner.cluster_key, owner.timeouts, owner.limits)
        self.member = Member(address=peer.address, state=MemberState.JOINING, since=time.time(),
                             info=None, source=peer.source)
        self.task: asyncio.Task[None] | None = None
        self.peer_changed = asyncio.Event()  # a newer record for this address (another version)

    def set(self, state: MemberState, info: NodeInfo | None = None, reason: str = "") -> None:
        old = self.member
        info = info if info is not None else old.info
        since = old.since if old.state == state else time.time()
        self.member = Member(address=old.address, state=state, since=since, info=info,
                             source=old.source, reason=reason)
        if old.state != state:
            log.info("node %s at %s: %s -> %s %s", info.name if info else "?", old.address,
                     old.state.value, state.value, reason)
            self.owner.changed(f"{info.name if info else old.address} {state.value}")

    async def run(self) -> None:
        """Follow the node until it turns out to duplicate another watcher's node."""
        delay = RETRY_MIN_S
        while True:
            advertised = self.peer.protocol_version
            if advertised is not None and advertised != PROTOCOL_VERSION:
                # Its Info would not even parse; say why it is left out and wait for a new record.
                self.set(MemberState.INCOMPATIBLE, reason=_version_reason(advertised))
                self.peer_changed.clear()
                await self.peer_changed.wait()
                continue
            try:
                await self._follow()
            except _Duplicate:
                return
            except Unauthenticated as exc:
                self.set(MemberState.UNAUTHENTICATED, reason=str(exc))
                self.client.abandon(f"membership lost the node: {exc}", self.owner.timeouts.info_rpc_s)
                await asyncio.sleep(UNAUTHENTICATED_RETRY_S)
                continue
            except EdgeMeshError as exc:
                self.set(MemberState.DOWN, reason=str(exc))
                # Streams still open on it would otherwise wait out their token-idle deadline.
                self.client.abandon(f"membership marked the node down: {exc}", self.owner.timeouts.info_rpc_s)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S) if self.member.state == MemberState.DOWN else RETRY_MIN_S

    def _accept(self, info: NodeInfo) -> None:
        refusal = self.owner.refusal(info)
        if info.protocol_version != PROTOCOL_VERSION:
            self.set(MemberState.INCOMPATIBLE, info, _version_reason(info.protocol_version))
        elif refusal:
            self.set(MemberState.INCOMPATIBLE, info, refusal)
        elif info.draining:
            self.set(MemberState.DRAINING, info)
        else:
            self.set(MemberState.READY, info)

    async def _follow(self) -> None:
        info = await self.client.info()
        if self.owner.is_duplicate(self, info.node_id):
            raise _Duplicate
        self._accept(info)
        tasks = {asyncio.create_task(self._watch_health()), asyncio.create_task(self._refresh())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raises why following stopped
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_health(self) -> None:
        while True:  # each watch has a (long) deadline; renew it when it runs out
            started = time.monotonic()
            async for serving in self.client.health_watch():
                if not serving:
                    self.set(MemberState.DRAINING, reason="health NOT_SERVING")
                elif self.member.state == MemberState.DRAINING:
                    self._accept(await self.client.info())
            if time.monotonic() - started < RETRY_MIN_S:
                raise EdgeMeshError("health watch ended at once")  # not a deadline: treat as broken

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.owner.timeouts.refresh_s)
            self._accept(await self.client.info())


def _version_reason(theirs: int) -> str:
    return (f"it speaks protocol version {theirs}, this gateway speaks {PROTOCOL_VERSION}: run the same "
            "EdgeMesh release on every device")


class _Duplicate(Exception):
    """This address reaches a node that another watcher already follows."""


class Membership:
    """The gateway's view of every node it has heard of."""

    def __init__(self, cluster_key: str, timeouts: Timeouts, limits: Limits,
                 on_change: Callable[[str], None] | None = None,
                 refuse: Callable[[NodeInfo], str] | None = None) -> None:
        self.cluster_key = cluster_key
        self.timeouts = timeouts
        self.limits = limits
        self._on_change = on_change
        self._refuse = refuse  # why a node that answered Info must not be used ('' = it may)
        self._watchers: dict[str, _Watcher] = {}

    def refusal(self, info: NodeInfo) -> str:
        return self._refuse(info) if self._refuse is not None else ""

    def changed(self, what: str) -> None:
        """A node's state changed (`what` says which, for people: "desk ready", "laptop down")."""
        if self._on_change is not None:
            self._on_change(what)

    def add(self, peer: Peer) -> None:
        """Start following an address (idempotent)."""
        known = self._watchers.get(peer.address)
        if known is not None:
            if peer.protocol_version is not None and peer.protocol_version != known.peer.protocol_version:
                known.peer = peer  # upgraded (or downgraded) in place: judge it by its new record
                known.peer_changed.set()
            return
        if peer.node_id is not None and any(
                w.member.node_id == peer.node_id and w.member.state != MemberState.DOWN
                for w in self._watchers.values()):
            return
        watcher = _Watcher(self, peer)
        self._watchers[peer.address] = watcher
        watcher.task = asyncio.get_running_loop().create_task(self._supervise(watcher))

    async def _supervise(self, watcher: _Watcher) -> None:
        await watcher.run()
        # run() only returns for a duplicate address of a node already followed
        self._watchers.pop(watcher.peer.address, None)
        await watcher.client.close()

    async def forget(self, address: str) -> None:
        """Stop following an address whose node is known to be gone for good (a restarted
        Ray actor serves elsewhere now); mDNS and static peers are never forgotten."""
        watcher = self._watchers.pop(address, None)
        if watcher is None:
            return
        if watcher.task is not None:
            watcher.task.cancel()
            await asyncio.gather(watcher.task, return_exceptions=True)
        await watcher.client.close()
        self.changed(f"{address} forgotten")

    def is_duplicate(self, watcher: _Watcher, node_id: NodeId) -> bool:
        return any(w is not watcher and w.member.node_id == node_id and w.member.state != MemberState.DOWN
                   for w in self._watchers.values())

    def members(self) -> list[Member]:
        return [w.member for w in self._watchers.values()]

    def ready(self) -> list[Member]:
        return [w.member for w in self._watchers.values() if w.member.state == MemberState.READY]

    def name_of(self, node_id: NodeId) -> str:
        """The node's name, for people (its id when it never answered Info)."""
        for w in self._watchers.values():
            if w.member.info is not None and w.member.info.node_id == node_id:
                return w.member.info.name
        return str(node_id)

    def client_for(self, node_id: NodeId) -> NodeClient | None:
        for w in self._watchers.values():
            if w.member.node_id == node_id:
                return w.client
        return None

    def mark_down(self, node_id: NodeId, reason: str) -> None:
        """The scheduler saw a node fail mid-call: stop routing to it until it proves itself again."""
        for w in self._watchers.values():
            if w.member.node_id == node_id and w.member.state == MemberState.READY:
                # Until its next Info answer proves otherwise (within refresh_s).
                w.set(MemberState.DOWN, reason=reason)

    async def refresh(self) -> None:
        """Ask every ready node for fresh Info now (after a planner changed what they hold),
        instead of waiting for the periodic refresh."""
        for w in list(self._watchers.values()):
            if w.member.state == MemberState.READY:
                try:
                    w._accept(await w.client.info())
                except EdgeMeshError as exc:  # the watcher's own loop notices and reports it
                    log.debug("refresh of %s failed: %s", w.peer.address, exc)

    async def wait_ready(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.ready()) >= count:
                return True
            await asyncio.sleep(0.1)
        return False

    async def stop(self) -> None:
        for w in self._watchers.values():
            if w.task is not None:
                w.task.cancel()
        for w in self._watchers.values():
            if w.task is not None:
                # Shutting down: a watcher's last error has nobody left to report to.
                await asyncio.gather(w.task, return_exceptions=True)
            await w.client.close()
        self._watchers.clear()
