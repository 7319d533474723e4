"""The head of a pipeline: the node of stage 0 runs a whole pipeline request.

Why the head and not the gateway drives the stages: with the gateway as the hub, every
decode step paid one round trip per stage plus the gateway's own work per stage, about a
quarter of a token's time on a small model. The head runs its own layers in process and
pays one round trip per later stage; the gateway only reads the token stream.

The head reaches later stages with the cluster key, over Forward streams of its own. It
trusts a stage's address only once the node there has proved it knows the cluster key and
is the node the gateway named (the Info challenge), and it forgets a peer whose step failed,
so a restarted node at the same address is checked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from functools import partial

from mesh.config import Limits, Timeouts
from mesh.errors import EdgeMeshError, InvalidInput, NotFound, PeerError, Unauthenticated
from mesh.pipeline import PipelineRun, StageLink
from mesh.transport.channels import NodeClient
from mesh.types import NodeId, PipelineHop, PipelineJob, StageOutput, StageStep, TokenEvent
from node.compute import ComputeThread
from node.stage_host import StageHost

log = logging.getLogger(__name__)


class LocalStageLink:
    """The head's own layers: steps run on the node's compute thread, no network."""

    def __init__(self, stages: StageHost, compute: ComputeThread) -> None:
        self.address = "local"
        self._stages = stages
        self._compute = compute
        self._session_id = ""

    async def step(self, step: StageStep) -> StageOutput:
        self._session_id = step.session_id
        return await asyncio.wrap_future(self._compute.call(partial(self._stages.step, step)))

    def close(self) -> None:
        if self._session_id:
            # Queued behind any step still running for it, and ahead of the next request's steps.
            self._compute.call(partial(self._stages.release, self._session_id))


class PeerLinks:
    """Connections from this node to the nodes of later stages, checked once and reused."""

    def __init__(self, cluster_key: str, timeouts: Timeouts, limits: Limits) -> None:
        self._key = cluster_key
        self._timeouts = timeouts
        self._limits = limits
        self._clients: dict[tuple[str, NodeId], NodeClient] = {}
        self._checking: dict[tuple[str, NodeId], asyncio.Lock] = {}

    async def client(self, hop: PipelineHop) -> NodeClient:
        key = (hop.address, hop.node_id)
        async with self._checking.setdefault(key, asyncio.Lock()):
            client = self._clients.get(key)
            if client is not None:
                return client
            client = NodeClient(hop.address, self._key, self._timeouts, self._limits)
            try:
                info = await client.info()
                if info.node_id != hop.node_id:
                    raise Unauthenticated(f"the node at {hop.address} is {info.node_id}, not {hop.node_id}")
            except EdgeMeshError as exc:
                await client.close()
                raise PeerError(f"stage node {hop.node_id} at {hop.address}: {exc}", node_id=hop.node_id) from exc
            self._clients[key] = client
            return client

    async def forget(self, node_id: NodeId) -> None:
        for key in [k for k in self._clients if k[1] == node_id]:
            self._checking.pop(key, None)
            await self._clients.pop(key).close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


class PipelineHead:
    def __init__(self, node_id: NodeId, stages: StageHost, compute: ComputeThread, peers: PeerLinks,
                 count_sent: Callable[[int], None]) -> None:
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

    async def run(self, job: PipelineJob) -> AsyncGenerator[TokenEvent, None]:
        self.check(job)
        links: list[StageLink] = [LocalStageLink(self._stages, self._compute)]
        try:
            for hop in job.stages[1:]:
                client = await self._peers.client(hop)
                links.append(client.open_forward(job.step_timeout_s))
        except BaseException:
            for link in links:
                link.close()
            raise
        run = PipelineRun(job, links, self._count_sent)
        try:
            async with contextlib.aclosing(run.generate()) as events:
                async for event in events:
                    yield event
        except PeerError as exc:
            if exc.node_id is not None and exc.node_id != self._node_id:
                await self._peers.forget(NodeId(exc.node_id))
            raise
