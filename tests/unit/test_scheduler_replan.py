"""Re-planning after a failure, through the real placement controller, on in-process nodes.

Three real nodes (tiny GGUF) that the gateway's PlacementController plans as a 2-stage
pipeline with a spare; a stage that stalls leaves no placement, and the request that found
it failed is answered on the pipeline the controller re-plans without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.membership import MemberState
from mesh.placement.controller import ControllerSettings, PlacementController
from mesh.scheduler import Scheduler
from mesh.types import GenerationRequest, RequestId, SamplingParams
from node.profile import model_profile
from tests.fixtures.in_process import InProcessNode, NodePool, gateway, node_pool, tiny_model

__all__ = ["node_pool", "tiny_model"]  # fixtures used by name

FREEZE_S = 4.0  # the stalled stage stays silent while the controller re-plans without it


@pytest.fixture(scope="module")
def trio(node_pool: NodePool) -> Iterator[list[InProcessNode]]:
    started = node_pool.start_together({name: {"role": "auto", "slots": 1} for name in ("a", "b", "c")})
    yield [started[name] for name in ("a", "b", "c")]


def test_a_stalled_stage_is_replaced_by_the_controller_and_the_request_answered(
        node_pool: NodePool, trio: list[InProcessNode], tiny_model: Path) -> None:
    by_id = {n.node_id: n for n in trio}

    async def scenario() -> None:
        pokes: list[PlacementController] = []
        async with gateway(node_pool, trio, on_change=lambda what: [c.poke(what) for c in pokes]) as gw:
            settings = ControllerSettings(interval_s=0.5, debounce_s=0.05, settle_s=0.1, claim_ttl_s=10.0,
                                          load_timeout_s=20.0, strategy="pipeline", stages=2)
            controller = PlacementController(gw.membership, model_profile(tiny_model, node_pool.model_sha),
                                             gw.metrics, settings)
            pokes.append(controller)
            gw.scheduler.replanner = controller
            controller.start()
            try:
                deadline = time.monotonic() + 20
                while not (placements := [p for p in gw.scheduler.placements() if len(p.stages) == 2]):
                    assert time.monotonic() < deadline, "the controller placed no 2-stage pipeline"
                    await asyncio.sleep(0.05)
                first = placements[0]
                victim = by_id[first.node_ids[1]]  # the last stage: the head names it when it stalls
                victim.freeze(FREEZE_S)
                started = time.monotonic()
                session = await gw.scheduler.open(GenerationRequest(
                    RequestId("replan"), (10, 20, 30), SamplingParams(seed=1), 6, frozenset()))
                events = [e async for e in session.events()]
                assert time.monotonic() - started < FREEZE_S, "the answer waited for the stalled stage"
                assert victim.node_id not in session.nodes
                assert len(session.nodes) == 2  # a pipeline again, on the survivor and the spare
                assert [e.position for e in events] == [3, 4, 5, 6, 7, 8]
                assert gw.state_of(victim) == MemberState.DOWN
                assert gw.counter("edgemesh_retries_total", reason="node_error") == 1
            finally:
                await controller.stop()

    asyncio.run(scenario())


def test_a_request_that_finds_a_placement_loading_waits_for_it(node_pool: NodePool, tiny_model: Path) -> None:
    """A request that arrives while the controller loads a placement (a first plan, or a switch
    that released the old one first) is answered on it, even where loading takes far longer
    than the gateway's connect deadline; before, it was told that nothing serves the model."""
    lone = node_pool.start("lone", role="auto", slots=1)

    async def scenario() -> None:
        async with gateway(node_pool, [lone]) as gw:
            settings = ControllerSettings(interval_s=0.5, debounce_s=0.05, settle_s=0.1, claim_ttl_s=10.0,
                                          load_timeout_s=20.0, strategy="replica")
            controller = PlacementController(gw.membership, model_profile(tiny_model, node_pool.model_sha),
                                             gw.metrics, settings)
            # A connect deadline shorter than any load: only waiting for the load can answer.
            impatient = dataclasses.replace(node_pool.timeouts, connect_s=0.01)
            scheduler = Scheduler(gw.membership, node_pool.model_sha, gw.metrics, impatient)
            scheduler.replanner = controller
            controller.start()
            try:
                deadline = time.monotonic() + 20
                while not controller.loading:
                    assert time.monotonic() < deadline, "the controller never started loading"
                    await asyncio.sleep(0.001)
                assert scheduler.context_length() is None  # nothing serves the model yet
                assert await scheduler.serving_context_length() is not None
                assert [p.kind for p in scheduler.placements()] == ["replica"]
            finally:
                await controller.stop()

    asyncio.run(scenario())
