"""The scheduler, membership and re-planning, directly against real in-process nodes.

Real node daemons (tiny GGUF, on loopback, see tests.fixtures.in_process) and a real
Membership and Scheduler; no subprocess, no HTTP. A stalled node is a real node whose event
loop is blocked; a moved placement is a real replica released through the node's RPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mesh.errors import CapacityExhausted, Unavailable
from mesh.membership import Membership, MemberState
from mesh.metrics import GatewayMetrics
from mesh.scheduler import NO_EMBEDDER, Scheduler, Session
from mesh.transport.channels import NodeClient
from mesh.types import (
    EmbedBatch,
    GenerationRequest,
    LayerRange,
    RequestId,
    SamplingParams,
    TokenEvent,
)
from tests.fixtures.in_process import LIMITS, InProcessNode, NodePool, gateway, node_pool, tiny_model

__all__ = ["node_pool", "tiny_model"]  # fixtures used by name

N_LAYER = 3
FREEZE_S = 2.5  # longer than first_token_s and token_idle_s (fixtures.in_process.TIMEOUTS)


@dataclasses.dataclass
class Mesh:
    pool: NodePool
    r1: InProcessNode  # replicas, one slot and no queue each: capacity 1
    r2: InProcessNode
    s1: InProcessNode  # stage nodes holding layers [0, 2) and [2, 3): a 2-stage pipeline
    s2: InProcessNode
    spare: InProcessNode  # holds nothing until a re-plan loads the replica onto it


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@asynccontextmanager
async def client_of(pool: NodePool, node: InProcessNode) -> AsyncIterator[NodeClient]:
    client = NodeClient(node.address, pool.cluster_key, pool.timeouts, LIMITS)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
def mesh(node_pool: NodePool) -> Iterator[Mesh]:
    started = node_pool.start_together({
        "r1": {"role": "replica", "slots": 1, "max_queue": 0}, "r2": {"role": "replica", "slots": 1, "max_queue": 0},
        "s1": {"role": "stage"}, "s2": {"role": "stage"}, "spare": {"role": "auto", "slots": 1, "max_queue": 0}})

    async def load_stages() -> None:
        for name, layers in (("s1", LayerRange(0, 2)), ("s2", LayerRange(2, N_LAYER))):
            async with client_of(node_pool, started[name]) as client:
                await client.load_stage(node_pool.model_sha, layers, n_ctx=512, slots=1, timeout_s=20)

    run(load_stages())
    yield Mesh(node_pool, **started)


def request(max_tokens: int = 8, seed: int = 7, replay: tuple[int, ...] = ()) -> GenerationRequest:
    return GenerationRequest(RequestId(f"t-{secrets.token_hex(3)}"), (10, 20, 30, 40), SamplingParams(seed=seed),
                             max_tokens, frozenset(), replay_tokens=replay)


async def drain(session: Session) -> list[TokenEvent]:
    return [event async for event in session.events()]


def by_id(*nodes: InProcessNode) -> list[InProcessNode]:
    return sorted(nodes, key=lambda n: n.node_id)


# ---------------------------------------------------------------------- routing policy


def test_least_outstanding_first_then_node_order_and_full_ones_skipped(mesh: Mesh) -> None:
    first, second = by_id(mesh.r1, mesh.r2)

    async def scenario() -> None:
        async with gateway(mesh.pool, [mesh.r1, mesh.r2]) as gw:
            s = gw.scheduler
            a = await s.open(request())
            assert a.nodes == [first.node_id]  # a tie at no load goes to node-id order
            b = await s.open(request())
            assert b.nodes == [second.node_id]  # the first is full (capacity 1)
            assert (s.outstanding(first.node_id), s.outstanding(second.node_id)) == (1, 1)
            with pytest.raises(CapacityExhausted, match=r"all 2 placement\(s\) are at capacity \(2 requests in "
                                                         r"flight\); retry shortly"):
                await s.open(request())
            await drain(b)
            assert s.outstanding(second.node_id) == 0
            c = await s.open(request())
            assert c.nodes == [second.node_id]  # the one with room, though it sorts second
            await drain(a)
            await drain(c)
            assert s.outstanding(first.node_id) == s.outstanding(second.node_id) == 0

    run(scenario())


def test_ties_go_to_the_fewest_stages_and_a_full_replica_gives_way_to_a_pipeline(mesh: Mesh) -> None:
    async def scenario() -> None:
        async with gateway(mesh.pool, [mesh.r1, mesh.s1, mesh.s2]) as gw:
            s = gw.scheduler
            kinds = sorted(p.kind for p in s.placements())
            assert kinds == ["pipeline", "replica"]
            a = await s.open(request())
            assert a.nodes == [mesh.r1.node_id]  # same load (none): one stage beats two
            b = await s.open(request())
            assert b.nodes == [mesh.s1.node_id, mesh.s2.node_id]  # the replica is full
            events = await drain(b)
            assert [e.position for e in events] == list(range(4, 4 + len(events)))
            await drain(a)

    run(scenario())


def test_unavailable_says_why(mesh: Mesh) -> None:
    async def scenario() -> None:
        membership = Membership(mesh.pool.cluster_key, mesh.pool.timeouts, LIMITS)
        empty = Scheduler(membership, mesh.pool.model_sha, GatewayMetrics(CollectorRegistry()), mesh.pool.timeouts)
        with pytest.raises(Unavailable, match="no node serving this model is ready; start one with `edgemesh node`"):
            await empty.open(request())
        async with gateway(mesh.pool, [mesh.r1, mesh.s1, mesh.s2]) as gw:
            everyone = {mesh.r1.node_id, mesh.s1.node_id}
            with pytest.raises(Unavailable, match=r"^no other node can take this request$"):
                await gw.scheduler.attach(request(), everyone, None)
        async with gateway(mesh.pool, [mesh.s1, mesh.s2]) as gw:  # a pipeline only: nothing embeds
            with pytest.raises(Unavailable) as refused:
                await gw.scheduler.embed(EmbedBatch(RequestId("e"), ((1, 2, 3),)))
            assert str(refused.value) == NO_EMBEDDER

    run(scenario())


# ---------------------------------------------------------------------- the admission queue


def patient(gw: Any, pool: NodePool, first_token_s: float) -> tuple[Scheduler, GatewayMetrics]:
    """A scheduler on the gateway's membership whose queue wait (the first-token deadline) is
    long enough for the requests ahead to finish on a busy machine."""
    metrics = GatewayMetrics(CollectorRegistry())
    return Scheduler(gw.membership, pool.model_sha, metrics,
                     dataclasses.replace(pool.timeouts, first_token_s=first_token_s)), metrics


def sample(metrics: GatewayMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {}) or 0.0


def test_requests_beyond_a_pipelines_slots_wait_their_turn_first_come_first_served(mesh: Mesh) -> None:
    """The pipeline has one slot per stage and its stages queue nothing: before the gateway's
    queue, the second and third requests got 429 at once. Now they wait, in order, and each
    answer is the one it gets alone."""
    async def tokens(session: Session) -> list[int]:
        return [e.token_id for e in await drain(session)]

    async def scenario() -> None:
        async with gateway(mesh.pool, [mesh.s1, mesh.s2]) as gw:
            s, metrics = patient(gw, mesh.pool, 20.0)
            alone = {seed: await tokens(await s.open(request(seed=seed))) for seed in (1, 2, 3)}
            assert s.queue_limit(set()) == mesh.s1.config.max_queue > 2
            running = await s.open(request(seed=1))
            second = asyncio.create_task(s.open(request(seed=2)))
            await asyncio.sleep(0.05)
            third = asyncio.create_task(s.open(request(seed=3)))
            await asyncio.sleep(0.3)
            assert not second.done() and not third.done()
            assert sample(metrics, "edgemesh_admission_queued_requests") == 2
            assert await tokens(running) == alone[1]
            got_second = await second  # first in line gets the freed slot
            assert not third.done()
            assert await tokens(got_second) == alone[2]
            assert await tokens(await third) == alone[3]
            assert sample(metrics, "edgemesh_admission_queued_requests") == 0
            assert sample(metrics, "edgemesh_admission_queue_wait_seconds_count") == 2
            assert s.outstanding(mesh.s1.node_id) == s.outstanding(mesh.s2.node_id) == 0

    run(scenario())


def test_the_queue_is_bounded_a_cancelled_waiter_gives_way_and_a_wait_has_a_deadline(mesh: Mesh) -> None:
    async def scenario() -> None:
        async with gateway(mesh.pool, [mesh.s1, mesh.s2]) as gw:
            s, _ = patient(gw, mesh.pool, 3.0)
            limit = s.queue_limit(set())
            running = await s.open(request(max_tokens=4))
            waiting = [asyncio.create_task(s.open(request(max_tokens=4))) for _ in range(limit)]
            await asyncio.sleep(0.2)
            with pytest.raises(CapacityExhausted, match=rf"{limit} request\(s\) already wait in the queue"):
                await s.open(request())
            waiting[0].cancel()  # the client of the first in line went away
            await asyncio.sleep(0.05)
            await drain(running)
            served = await waiting[1]  # the next one got the turn the cancelled one could not use
            assert [e.position for e in await drain(served)] == [4, 5, 6, 7]
            # The rest wait longer than the first-token deadline behind a stream held open.
            held = await waiting[2]
            late = await asyncio.gather(*waiting[3:], return_exceptions=True)
            assert late and all(isinstance(e, CapacityExhausted) and "stayed at capacity" in str(e) for e in late)
            await drain(held)
            assert s.outstanding(mesh.s1.node_id) == 0 and len(s._queue) == 0

    run(scenario())


# ---------------------------------------------------------------------- the attach loop


def test_a_stalled_node_before_the_first_token_is_blamed_and_another_picked(mesh: Mesh) -> None:
    stalled, healthy = by_id(mesh.r1, mesh.r2)  # the stalled one is what routing picks first

    async def scenario() -> None:
        async with gateway(mesh.pool, [mesh.r1, mesh.r2]) as gw:
            stalled.freeze(FREEZE_S)
            session = await gw.scheduler.open(request())
            assert session.nodes == [healthy.node_id]
            assert gw.state_of(stalled) == MemberState.DOWN
            assert gw.counter("edgemesh_retries_total", reason="node_error") == 1
            assert gw.scheduler.outstanding(stalled.node_id) == 0  # the failed attempt gave its count back
            assert len(await drain(session)) == 8
            # Membership: once the node answers again it is routed to again.
            await gw.wait_state(stalled, MemberState.READY, timeout_s=FREEZE_S + 10)

    run(scenario())


def test_a_moved_replica_is_looked_up_again_and_another_picked(mesh: Mesh) -> None:
    moved, other = by_id(mesh.r1, mesh.r2)
    slow_refresh = dataclasses.replace(mesh.pool.timeouts, refresh_s=60.0)  # keep the stale view
    pool = dataclasses.replace(mesh.pool, timeouts=slow_refresh)

    async def scenario() -> None:
        async with gateway(pool, [mesh.r1, mesh.r2]) as gw:
            async with client_of(mesh.pool, moved) as client:
                assert await client.release_holding(mesh.pool.model_sha, None, "test") == "released"
                try:
                    assert len(gw.scheduler.placements()) == 2  # Info still says it holds the replica
                    session = await gw.scheduler.open(request())
                    assert session.nodes == [other.node_id]
                    assert gw.counter("edgemesh_retries_total", reason="moved") == 1
                    assert gw.state_of(moved) == MemberState.READY  # a move is not a failure
                    assert [p.node_ids for p in gw.scheduler.placements()] == [(other.node_id,)]
                    await drain(session)
                finally:
                    await client.load_model(mesh.pool.model_sha, 2048, 20, "test")

    run(scenario())


def test_a_stall_mid_stream_is_replayed_on_another_replica_with_the_same_tokens(mesh: Mesh) -> None:
    stalled, healthy = by_id(mesh.r1, mesh.r2)
    max_tokens = 300  # the node is still generating when its loop stalls

    async def scenario() -> None:
        async with gateway(mesh.pool, [healthy]) as gw:
            reference = [e.token_id for e in await drain(await gw.scheduler.open(request(max_tokens)))]
        async with gateway(mesh.pool, [mesh.r1, mesh.r2]) as gw:
            session = await gw.scheduler.open(request(max_tokens))
            stalled.freeze(FREEZE_S)
            events = await drain(session)
            assert session.nodes == [stalled.node_id, healthy.node_id]
            assert [e.token_id for e in events] == reference
            assert [e.position for e in events] == list(range(4, 4 + max_tokens))
            replayed = gw.counter("edgemesh_replayed_tokens_total")
            assert 1 <= replayed < max_tokens
            assert gw.counter("edgemesh_retries_total", reason="midstream_failover") == 1
            assert gw.state_of(stalled) == MemberState.DOWN
            assert gw.scheduler.outstanding(stalled.node_id) == gw.scheduler.outstanding(healthy.node_id) == 0
            await gw.wait_state(stalled, MemberState.READY, timeout_s=FREEZE_S + 10)

    run(scenario())


# ---------------------------------------------------------------------- re-planning


class LoadOnSpare:
    """A Replanner (mesh.scheduler.Replanner) that answers a failure as a placement controller
    with one spare would: it loads the whole model onto the spare and refreshes membership."""

    def __init__(self, pool: NodePool, spare: InProcessNode, membership: Membership) -> None:
        self.pool, self.spare, self.membership = pool, spare, membership
        self.reasons: list[str] = []

    async def replan(self, reason: str, timeout_s: float = 30.0) -> None:
        self.reasons.append(reason)
        async with client_of(self.pool, self.spare) as client:
            await client.load_model(self.pool.model_sha, 2048, timeout_s, "test")
        await self.membership.refresh()


def test_a_failure_that_leaves_no_placement_is_repaired_by_the_replanner(mesh: Mesh) -> None:
    async def scenario() -> None:
        async with gateway(mesh.pool, [mesh.r1, mesh.spare]) as gw:
            replanner = LoadOnSpare(mesh.pool, mesh.spare, gw.membership)
            gw.scheduler.replanner = replanner
            assert [p.node_ids for p in gw.scheduler.placements()] == [(mesh.r1.node_id,)]
            mesh.r1.freeze(FREEZE_S)
            try:
                session = await gw.scheduler.open(request())
                assert session.nodes == [mesh.spare.node_id]
                assert replanner.reasons == [f"failure of {mesh.r1.node_id}"]
                await drain(session)
            finally:
                async with client_of(mesh.pool, mesh.spare) as client:
                    await client.release_holding(mesh.pool.model_sha, None, "test")
            await gw.wait_state(mesh.r1, MemberState.READY, timeout_s=FREEZE_S + 10)

    run(scenario())

