"""The head of a pipeline: the node of stage 0 runs a whole pipeline request.

Why the head and not the gateway drives the stages: with the gateway as the hub, every
decode step paid one round trip per stage plus the gateway's own work per stage, about a
quarter of a token's time on a small model. The head runs its own layers in process and
pays one round trip per later stage; the gateway only reads the token stream.

The head reaches a later stage over that node's step socket (mesh.transport.step_socket),
one connection per run, or over a gRPC Forward stream when the node has its step socket
turned off. It trusts a stage's address only once the node there has proved it knows the
cluster key and is the node the gateway named (the Info challenge, and again the step
socket's handshake), and it forgets a peer whose step failed, so a restarted node at the
same address is checked again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from functools import partial

from mesh.config import Limits, Timeouts
from mesh.discovery import parse_host_port
from mesh.errors import ConfigError, EdgeMeshError, InvalidInput, NotFound, PeerError, Unauthenticated
from mesh.pipeline import HubStages, LaterStages, PipelineRun, StageLink
from mesh.sampling import check_request
from mesh.transport.channels import NodeClient, StageStream
from mesh.transport.hidden_wire import CountSent
from mesh.transport.ring import RingLink
from mesh.transport.step_socket import StepConnection
from mesh.types import HiddenDType, NodeId, PipelineHop, PipelineJob, RingHop, StageOutput, StageStep, TokenEvent
from node.compute import ComputeThread
from node.stage_host import StageHost

log = logging.getLogger(__name__)


class LocalStageLink:
    """The head's own layers: steps run on the node's compute thread, no network."""

    def __init__(self, stages: StageHost, compute: ComputeThread) -> None:
        self.address = "local"
        self.rtt_s: float | None = None
        self._stages = stages
        self._compute = compute
        self._session_id = ""

    def step(self, step: StageStep, hidden_dtype: HiddenDType = "f32") -> StageOutput:
        self._session_id = step.session_id  # the head's own layers take token ids: no hidden states to encode
        return self._compute.call(partial(self._stages.step, step)).result()

    def interrupt(self) -> None:
        """A step on the compute thread runs to its end (milliseconds); nothing to cut."""

    def close(self) -> None:
        if self._session_id:
            # Queued behind any step still running for it, and ahead of the next request's steps.
            self._compute.call(partial(self._stages.release, self._session_id))


class ForwardStageLink:
    """A later stage over a gRPC Forward stream (its node has no step socket), driven from
    the run's driver thread through the event loop that owns the stream."""

    def __init__(self, stream: StageStream, loop: asyncio.AbstractEventLoop) -> None:
        self.address = stream.address
        self.rtt_s: float | None = None  # grpc does not show its connection: f32 under auto
        self._stream = stream
        self._loop = loop
        self._closed = threading.Event()

    def step(self, step: StageStep, hidden_dtype: HiddenDType = "f32") -> StageOutput:
        return asyncio.run_coroutine_threadsafe(self._stream.step(step, hidden_dtype), self._loop).result()

    def interrupt(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._loop.call_soon_threadsafe(self._stream.close)

    def close(self) -> None:
        self.interrupt()


@dataclass(frozen=True)
class CheckedStageNode:
    """A later-stage node this head has checked."""

    client: NodeClient
    host: str
    step_port: int  # 0: the node has no step socket; use Forward


class PeerLinks:
    """Connections from this node to the nodes of later stages, checked once and reused."""

    def __init__(self, cluster_key: str, timeouts: Timeouts, limits: Limits) -> None:
        self._key = cluster_key
        self._timeouts = timeouts
        self._limits = limits
        self._peers: dict[tuple[str, NodeId], CheckedStageNode] = {}
        self._checking: dict[tuple[str, NodeId], asyncio.Lock] = {}

    async def open_later(self, hops: Sequence[PipelineHop], step_timeout_s: float,
                         count_sent: CountSent) -> LaterStages | None:
        """Connections of the run's own to the nodes of the later stages: a ring when there are
        two or more and every one has a step socket, else a hub (mesh.pipeline). `count_sent`
        counts the hidden states the head sends (a ring's stages count their own hops)."""
        if not hops:
            return None  # the head's layers are the whole model
        peers = [await self._peer(hop) for hop in hops]
        if len(hops) >= 2 and all(peer.step_port for peer in peers):
            first = await self._open_step(hops[0], peers[0], step_timeout_s)
            try:
                back = await self._open_step(hops[-1], peers[-1], step_timeout_s)
            except BaseException:
                first.close()
                raise
            ring = [RingHop(hop.node_id, await _address_of(peer.host), peer.step_port)
                    for hop, peer in zip(hops, peers, strict=True)]
            loop = asyncio.get_running_loop()

            def probe() -> concurrent.futures.Future[NodeId | None]:
                return asyncio.run_coroutine_threadsafe(self.first_unresponsive(hops), loop)

            return RingLink(first, back, ring, self._timeouts, step_timeout_s, probe, self._probe_s(), count_sent)
        links: list[StageLink] = []
        try:
            for hop in hops:
                links.append(await self.open_link(hop, step_timeout_s))
        except BaseException:
            for link in links:
                link.close()
            raise
        return HubStages(links, [hop.node_id for hop in hops], count_sent)

    async def first_unresponsive(self, hops: Sequence[PipelineHop]) -> NodeId | None:
        """The first of these stages' nodes that does not answer Info in time (a stuck ring).
        Within half the margin the gateway gives a head past its step deadline, so that the
        head's answer, naming the stage, reaches the gateway before the gateway gives up on it."""
        probe_s = self._probe_s()
        async def answers(hop: PipelineHop) -> bool:
            peer = self._peers.get((hop.address, hop.node_id))
            if peer is None:
                return False
            try:
                await asyncio.wait_for(peer.client.info(), probe_s)
            except (EdgeMeshError, TimeoutError):
                return False
            return True

        results = await asyncio.gather(*(answers(hop) for hop in hops))
        return next((hop.node_id for hop, ok in zip(hops, results, strict=True) if not ok), None)

    def _probe_s(self) -> float:
        return min(self._timeouts.info_rpc_s, self._timeouts.head_margin_s / 2)

    async def open_link(self, hop: PipelineHop, step_timeout_s: float) -> StageLink:
        """A connection of its own to the node of a later stage, for one run."""
        peer = await self._peer(hop)
        if peer.step_port == 0:
            return ForwardStageLink(peer.client.open_forward(step_timeout_s), asyncio.get_running_loop())
        return await self._open_step(hop, peer, step_timeout_s)

    async def _open_step(self, hop: PipelineHop, peer: CheckedStageNode, step_timeout_s: float) -> StepConnection:
        if peer.step_port > 65535:
            raise PeerError(f"stage node {hop.node_id} advertises step port {peer.step_port}", node_id=hop.node_id)
        opening = asyncio.ensure_future(asyncio.to_thread(
            StepConnection.open, peer.host, peer.step_port, self._key, hop.node_id, self._timeouts, self._limits,
            step_timeout_s))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The run was abandoned while the connection was being made: close it once made,
            # so the stage does not keep a connection nobody will use.
            opening.add_done_callback(_close_if_opened)
            raise
        except EdgeMeshError as exc:
            raise PeerError(f"stage node {hop.node_id}: {exc}", node_id=hop.node_id) from exc

    async def _peer(self, hop: PipelineHop) -> CheckedStageNode:
        key = (hop.address, hop.node_id)
        try:
            async with self._checking.setdefault(key, asyncio.Lock()):
                return await self._checked(hop, key)
        finally:
            if key not in self._peers:
                # A check that failed keeps nothing: the addresses a caller names must not grow
                # this table without bound.
                self._checking.pop(key, None)

    async def _checked(self, hop: PipelineHop, key: tuple[str, NodeId]) -> CheckedStageNode:
        peer = self._peers.get(key)
        if peer is not None:
            return peer
        try:
            host, _port = parse_host_port(hop.address)
        except ConfigError as exc:
            raise InvalidInput(f"stage node {hop.node_id}: {exc}") from None
        client = NodeClient(hop.address, self._key, self._timeouts, self._limits, node_id=hop.node_id)
        try:
            info = await client.info()
            if info.node_id != hop.node_id:
                raise Unauthenticated(f"the node at {hop.address} is {info.node_id}, not {hop.node_id}")
        except EdgeMeshError as exc:
            await client.close()
            raise PeerError(f"stage node {hop.node_id} at {hop.address}: {exc}", node_id=hop.node_id) from exc
        won = self._peers.get(key)
        if won is not None:  # a check that started beside this one (after a failed one) got there first
            await client.close()
            return won
        peer = self._peers[key] = CheckedStageNode(client, host, info.step_port)
        return peer

    async def forget(self, node_id: NodeId) -> None:
        for key in [k for k in self._peers if k[1] == node_id]:
            self._checking.pop(key, None)
            await self._peers.pop(key).client.close()

    async def close(self) -> None:
        for peer in self._peers.values():
            await peer.client.close()
        self._peers.clear()


async def _address_of(host: str) -> str:
    """The IP address a ring's stages dial for `host` (a stage refuses names: see mesh.transport.ring)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PeerError(f"cannot resolve stage host {host}: {exc}") from exc
    return str(found[0][4][0])


def _close_if_opened(opening: asyncio.Future[StepConnection]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class PipelineHead:
    def __init__(self, node_id: NodeId, stages: StageHost, compute: ComputeThread, peers: PeerLinks,
                 count_sent: CountSent) -> None:
        self._node_id = node_id
        self._stages = stages
        self._compute = compute
        self._peers = peers
        self._count_sent = count_sent

    def check(self, job: PipelineJob) -> None:
        """Refuse a job this node cannot head, before any work."""
        head = job.stages[0]
        if head.node_id != self._node_id:
            raise InvalidInput(f"stage 0 is node {head.node_id}; this is {self._node_id}")
        sha = job.request.model_sha256
        held = {h.layers for h in self._stages.held() if h.model_sha256 == sha}
        if head.layers not in held:
            raise NotFound(f"no stage [{head.layers.first}, {head.layers.last_exclusive}) of {sha[:12]}… "
                           "is loaded here")
        model = next((m for m in self._stages.files if m.sha256 == sha), None)
        if model is not None and job.stages[-1].layers.last_exclusive != model.n_layers:
            raise InvalidInput(f"the stages end at layer {job.stages[-1].layers.last_exclusive}; the model has "
                               f"{model.n_layers}")
        # The last stage checks them again against its own vocabulary; refused here, before any work.
        check_request(job.request.sampling, job.request.top_logprobs,
                      model.n_vocab if model is not None and model.n_vocab else 2**32)

    async def run(self, job: PipelineJob) -> AsyncGenerator[TokenEvent, None]:
        self.check(job)
        later = await self._peers.open_later(job.stages[1:], job.step_timeout_s, self._count_sent)
        run = PipelineRun(job, LocalStageLink(self._stages, self._compute), later)
        try:
            async with contextlib.aclosing(run.generate()) as events:
                async for event in events:
                    yield event
        except PeerError as exc:
            if exc.node_id is not None and exc.node_id != self._node_id:
                await self._peers.forget(NodeId(exc.node_id))
            raise
