"""The planner is pure: memory never exceeded, every layer covered once per pipeline,
deterministic and order-independent, and more nodes never make a plan infeasible."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.placement.planner import ModelProfile, PeerCapability, Policy, plan, replica_bytes, stage_bytes
from mesh.types import ModelSha, NodeId

MiB = 2**20
# Shaped like the default model: 30 layers of ~2.2 MiB, a 28 MiB tied embedding.
PROFILE = ModelProfile(sha256=ModelSha("a" * 64), name="smol", file_bytes=98 * MiB,
                       layer_bytes=tuple([int(2.2 * MiB)] * 30), embed_bytes=28 * MiB, head_bytes=28 * MiB,
                       kv_bytes_per_token_layer=768, n_embd=576, n_head=9, n_ff=1536, n_vocab=49152)
POLICY = Policy(n_ctx=512)


def peer(i: int, mib: float, speed: float = 10.0) -> PeerCapability:
    return PeerCapability(NodeId(f"node{i:02d}"), f"n{i}", int(mib * MiB), speed)


def check(result_plan, peers: list[PeerCapability]) -> None:  # type: ignore[no-untyped-def]
    budget = {p.node_id: p.memory_budget for p in peers}
    policy = Policy(n_ctx=result_plan.n_ctx, prefill_chunk=result_plan.prefill_chunk)  # what it was sized for
    seen: set[NodeId] = set()
    for placement in result_plan.placements:
        layers = [s.layers for s in placement.stages]
        assert layers[0].first == 0 and layers[-1].last_exclusive == PROFILE.n_layers
        assert all(a.last_exclusive == b.first for a, b in itertools.pairwise(layers))
        for stage in placement.stages:
            assert stage.node_id not in seen  # a node serves one placement
            seen.add(stage.node_id)
            need = replica_bytes(PROFILE, policy) if placement.kind == "replica" else \
                stage_bytes(PROFILE, policy, stage.layers)
            assert need <= budget[stage.node_id]
    assert seen.isdisjoint(result_plan.spares)
    assert seen | set(result_plan.spares) == set(budget)


def test_big_nodes_get_replicas_small_ones_a_pipeline() -> None:
    peers = [peer(1, 400), peer(2, 60), peer(3, 60), peer(4, 60), peer(5, 60)]
    result = plan(peers, PROFILE, POLICY)
    kinds = sorted(p.kind for p in result.placements)
    assert kinds == ["pipeline", "replica"]
    check(result, peers)
    assert any("replica" in r for r in result.reasons) and any("pipeline" in r for r in result.reasons)


def test_faster_nodes_take_more_layers() -> None:
    peers = [peer(1, 200, speed=30.0), peer(2, 200, speed=10.0)]
    result = plan(peers, PROFILE, Policy(n_ctx=512, strategy="pipeline", stages=2))
    stages = result.placements[0].stages
    assert stages[0].node_id == "node01" and stages[0].layers.count > stages[1].layers.count


def test_infeasible_plans_say_why() -> None:
    result = plan([peer(1, 20), peer(2, 20)], PROFILE, POLICY)
    assert not result.feasible and set(result.spares) == {"node01", "node02"}
    assert any("cannot hold" in r for r in result.reasons)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(10, 500), st.floats(0.5, 50)), min_size=1, max_size=7), st.randoms())
def test_plans_respect_memory_and_cover_layers_in_any_order(specs: list[tuple[float, float]], rnd) -> None:  # type: ignore[no-untyped-def]
    peers = [peer(i, mib, speed) for i, (mib, speed) in enumerate(specs)]
    result = plan(peers, PROFILE, POLICY)
    check(result, peers)
    shuffled = list(peers)
    rnd.shuffle(shuffled)
    assert plan(shuffled, PROFILE, POLICY) == result


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(10, 300), st.floats(0.5, 50)), min_size=1, max_size=6),
       st.tuples(st.floats(10, 300), st.floats(0.5, 50)))
def test_more_nodes_never_make_a_plan_infeasible(specs: list[tuple[float, float]],
                                                  extra: tuple[float, float]) -> None:
    peers = [peer(i, mib, speed) for i, (mib, speed) in enumerate(specs)]
    if plan(peers, PROFILE, POLICY).feasible:
        more = [*peers, peer(len(peers), *extra)]
        assert plan(more, PROFILE, POLICY).feasible


def test_smaller_chunks_and_contexts_are_tried_before_giving_up() -> None:
    peers = [peer(i, 57) for i in range(3)]  # 60 MB each: nothing fits a 2048 context
    result = plan(peers, PROFILE, Policy(n_ctx=2048))
    assert result.feasible and result.placements[0].kind == "pipeline"
    assert (result.n_ctx, result.prefill_chunk) < (2048, 512)
    assert "planned with a context of" in result.reasons[0]
    check(result, peers)
    assert not plan(peers, PROFILE, Policy(n_ctx=2048, strategy="replica")).feasible
