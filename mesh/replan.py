"""Repair a pipeline whose stage failed: give the failed stage's layers to a spare node,
or, with no spare, split the layers afresh over the survivors.

Runs on the gateway, between the failure and the replay: the scheduler asks for a repair,
then picks a placement again (see Scheduler._failover). Loading is a LoadStage call on the
chosen nodes; the new chain forms from what they then report in Info.
"""

from __future__ import annotations

import asyncio
import logging
import time

from mesh.errors import EdgeMeshError
from mesh.membership import Membership
from mesh.metrics import GatewayMetrics
from mesh.placements import pipeline_placements
from mesh.planner import even_split
from mesh.types import LayerRange, ModelSha, NodeId, NodeInfo, Placement, StageHeld

log = logging.getLogger(__name__)

STAGE_LOAD_TIMEOUT_S = 60.0


class Replanner:
    def __init__(self, membership: Membership, model_sha: ModelSha, metrics: GatewayMetrics) -> None:
        self._membership = membership
        self._model_sha = model_sha
        self._metrics = metrics
        # Streams that fail together must not each re-plan: the second waits, then finds the
        # first one's repair already in place (its pick succeeds without loading anything).
        self._repairing = asyncio.Lock()

    def _ready(self) -> dict[NodeId, NodeInfo]:
        return {m.info.node_id: m.info for m in self._membership.ready() if m.info is not None}

    def _holds_file(self, info: NodeInfo) -> bool:
        return any(m.sha256 == self._model_sha for m in (*info.files, *info.models))

    def spares(self, busy: set[NodeId]) -> list[NodeInfo]:
        """Ready nodes with the model file that serve nothing of this model yet."""
        return [info for node_id, info in sorted(self._ready().items())
                if node_id not in busy and self._holds_file(info)
                and not any(s.model_sha256 == self._model_sha for s in info.stages)
                and not any(m.sha256 == self._model_sha for m in info.models)]

    async def repair(self, failed: Placement, gone: set[NodeId] | None, in_use: set[NodeId]) -> bool:
        """Make a complete pipeline possible again without the `gone` nodes (None: without
        any node of `failed`); True when something was loaded."""
        async with self._repairing:
            avoid = gone or set(failed.node_ids)
            if any(avoid.isdisjoint(p.node_ids)
                   for p in pipeline_placements(list(self._ready().values()), self._model_sha)):
                return True  # another stream's repair (or a node that came back) already did it
            return await self._repair(failed, gone, in_use)

    async def _repair(self, failed: Placement, gone: set[NodeId] | None, in_use: set[NodeId]) -> bool:
        if failed.kind != "pipeline":
            return False
        started = time.monotonic()
        ready = self._ready()
        gone = gone or set(failed.node_ids)
        culprit = ",".join(sorted(gone))
        held = held_stages(ready, self._model_sha)  # new stages copy the shape of the surviving ones
        slots = max((s.slots for s in held), default=1)
        chunk = min((s.prefill_chunk for s in held), default=0)
        n_ctx = min((m.n_ctx for i in ready.values() for m in i.files if m.sha256 == self._model_sha), default=2048)
        try:
            lost = [s for s in failed.stages if s.node_id in gone]
            spares = self.spares(in_use | gone)
            if len(spares) >= len(lost):
                for stage, spare in zip(lost, spares, strict=False):
                    await self._load(spare, stage.layers, n_ctx, slots, chunk)
                reason = "spare"
            else:
                survivors = [n for n in failed.node_ids if n not in gone and n in ready] + \
                    [s.node_id for s in spares]
                if not survivors:
                    return False
                n_layers = failed.stages[-1].layers.last_exclusive
                for node_id, layers in zip(survivors, even_split(n_layers, len(survivors)), strict=True):
                    await self._load(ready[node_id], layers, n_ctx, slots, chunk)
                reason = "survivors"
        except EdgeMeshError as exc:
            log.warning("re-plan after the failure of %s failed: %s", culprit, exc)
            return False
        await self._membership.refresh()
        self._metrics.replans.labels(reason).inc()
        log.info("re-planned the pipeline without %s (%s) in %.2fs", culprit, reason, time.monotonic() - started)
        return True

    async def _load(self, info: NodeInfo, layers: LayerRange, n_ctx: int, slots: int, chunk: int) -> None:
        client = self._membership.client_for(info.node_id)
        if client is None:
            raise EdgeMeshError(f"node {info.name} has no connection")
        log.info("loading layers [%d, %d) on %s", layers.first, layers.last_exclusive, info.name)
        await client.load_stage(self._model_sha, layers, n_ctx, slots, STAGE_LOAD_TIMEOUT_S, chunk)


def held_stages(ready: dict[NodeId, NodeInfo], model_sha: ModelSha) -> list[StageHeld]:
    """The stages the surviving nodes hold of the model: new stages copy their shape."""
    return [s for info in ready.values() for s in info.stages if s.model_sha256 == model_sha]
