"""The pure parts of the placement controller: what node reports become for the planner
(reports.capability, policy_for), what the nodes hold (held_by, holdings_of), what can be
routed to (routes), and the shape each stage is loaded with (stage_shapes)."""

from __future__ import annotations

from dataclasses import replace

from mesh.placement.decide import AS_HELD, decide
from mesh.placement.holdings import held_by, holdings_of, stage_shapes
from mesh.placement.planner import Policy
from mesh.placement.reports import capabilities, capability, policy_for
from mesh.placement.routes import routable as routes
from mesh.placement.routes import stage_slots
from mesh.types import (
    IDLE_PROBE,
    LayerRange,
    ModelHeld,
    ModelSha,
    NodeId,
    NodeInfo,
    Placement,
    StageHeld,
    StagePlacement,
)
from tests.unit.test_planner import PROFILE, MiB, peer

SHA = PROFILE.sha256
OTHER = ModelSha("c" * 64)
N = PROFILE.n_layers


def model(sha: ModelSha = SHA, n_ctx: int = 2048, shard_copy: bool = False) -> ModelHeld:
    return ModelHeld(name="smol", sha256=sha, n_layers=N, file_bytes=98 * MiB, n_ctx=n_ctx, architecture="llama",
                     n_vocab=49152, shard_copy=shard_copy)


def stage(first: int, last: int, sha: ModelSha = SHA, n_ctx: int = 0, chunk: int = 512, slots: int = 1) -> StageHeld:
    return StageHeld(model_sha256=sha, layers=LayerRange(first, last), slots=slots, weight_bytes=1, kv_cache_bytes=1,
                     compute_bytes=1, prefill_chunk=chunk, n_ctx=n_ctx)


def info(n: int, **fields: object) -> NodeInfo:
    base = NodeInfo(node_id=NodeId(f"node{n:02d}"), name=f"n{n}", version="0", protocol_version=1, pid=1,
                    memory_total=8000 * MiB, memory_free=4000 * MiB, memory_limit=0, threads=2, models=(),
                    slots=1, max_queue=4, in_flight=0, draining=False, grpc_port=1, metrics_port=2,
                    files=(model(),), decode_tokens_per_second=12.5)
    return replace(base, **fields)  # type: ignore[arg-type]


def pipeline(*stages: tuple[int, int, int]) -> Placement:
    return Placement("pipeline", SHA, PROFILE.name,
                     tuple(StagePlacement(NodeId(f"node{n:02d}"), LayerRange(a, b)) for n, a, b in stages))


def replica(n: int) -> Placement:
    return Placement("replica", SHA, "smol", (StagePlacement(NodeId(f"node{n:02d}"), LayerRange(0, N)),))


# ---------------------------------------------------------------------------- reports


def test_a_report_becomes_the_planners_capability() -> None:
    cap = capability(info(1, memory_budget=300 * MiB, stages=(stage(20, 30), stage(10, 20), stage(0, 5, OTHER))),
                     SHA)
    assert cap.node_id == "node01" and cap.name == "n1"
    assert cap.memory_budget == 300 * MiB  # the node's own budget wins
    assert cap.tokens_per_second == 12.5
    assert cap.has_file and cap.can_replica
    assert cap.held_first == 10  # the first layer it holds of this model (not of another)
    assert capability(info(1), SHA).held_first == -1
    assert not capability(info(1), SHA).speed_settled  # a start-up probe does not compare across nodes
    assert capability(info(1, speed_source=IDLE_PROBE), SHA).speed_settled


def test_without_a_reported_budget_the_limit_and_free_memory_decide() -> None:
    assert capability(info(1), SHA).memory_budget == 4000 * MiB
    assert capability(info(1, memory_limit=60 * MiB), SHA).memory_budget == 60 * MiB
    assert capability(info(1, memory_limit=9000 * MiB), SHA).memory_budget == 4000 * MiB


def test_what_a_node_may_serve_follows_its_file_and_role() -> None:
    assert not capability(info(1, files=()), SHA).has_file
    assert not capability(info(1, files=(model(OTHER),)), SHA).has_file
    stage_only = capability(info(1, stage_only=True), SHA)
    assert stage_only.has_file and not stage_only.can_replica
    shard = capability(info(1, files=(model(shard_copy=True),)), SHA)
    assert shard.has_file and not shard.can_replica
    # A node serving the model as a replica has it, whole.
    serving = capability(info(1, files=(), models=(model(),)), SHA)
    assert serving.has_file and serving.can_replica


def test_capabilities_are_in_node_id_order() -> None:
    caps = capabilities([info(3), info(1), info(2)], SHA)
    assert [c.node_id for c in caps] == ["node01", "node02", "node03"]


def test_the_policy_takes_the_smallest_context_and_slot_count_of_the_nodes() -> None:
    infos = [info(1, files=(model(n_ctx=2048),), slots=4), info(2, files=(model(n_ctx=1024),), slots=2),
             info(3, files=(model(OTHER, n_ctx=256),), slots=8)]
    policy = policy_for(infos, SHA, "pipeline", 3)
    assert policy == Policy(n_ctx=1024, sessions_per_stage=2, strategy="pipeline", stages=3)
    assert policy_for([], SHA, "auto", 0) == Policy(n_ctx=2048, sessions_per_stage=1, strategy="auto", stages=0)
    assert policy_for([info(1, slots=0)], SHA, "auto", 0).sessions_per_stage == 1


def test_stages_are_sized_for_the_sessions_a_node_reports_for_them_not_its_replica_slots() -> None:
    # A node with auto slots serves 8 streams as a replica and one session per stage; an older
    # node reports no stage sessions and its slots count.
    auto, older = info(1, slots=8, stage_sessions=1), info(2, slots=3)
    assert policy_for([auto], SHA, "pipeline", 2).sessions_per_stage == 1
    assert policy_for([older], SHA, "pipeline", 2).sessions_per_stage == 3
    assert policy_for([info(3, slots=8, stage_sessions=4), older], SHA, "pipeline", 2).sessions_per_stage == 3


# ---------------------------------------------------------------------------- holdings


def test_holdings_of_placements_name_stages_by_layers_and_replicas_by_none() -> None:
    assert holdings_of([replica(1), pipeline((2, 0, 10), (3, 10, N))]) == {
        (NodeId("node01"), None), (NodeId("node02"), LayerRange(0, 10)), (NodeId("node03"), LayerRange(10, N))}
    assert holdings_of([]) == set()


def test_held_by_reads_what_the_nodes_report_for_this_model_only() -> None:
    infos = [info(1, models=(model(),)), info(2, stages=(stage(0, 10), stage(10, 20))),
             info(3, models=(model(OTHER),), stages=(stage(0, 30, OTHER),)), info(4)]
    assert held_by(infos, SHA) == {(NodeId("node01"), None), (NodeId("node02"), LayerRange(0, 10)),
                                   (NodeId("node02"), LayerRange(10, 20))}


def test_a_converged_decision_is_held_exactly() -> None:
    infos = [info(1, memory_budget=400 * MiB), info(2, memory_budget=120 * MiB), info(3, memory_budget=120 * MiB)]
    peers = capabilities(infos, SHA)
    decision = decide(peers, PROFILE, Policy(n_ctx=512), [])
    by_node = {i.node_id: i for i in infos}
    for p in decision.placements:
        for s in p.stages:
            current = by_node[s.node_id]
            by_node[s.node_id] = replace(current, models=(model(),)) if p.kind == "replica" else \
                replace(current, stages=(*current.stages, stage(s.layers.first, s.layers.last_exclusive)))
    assert held_by(list(by_node.values()), SHA) == holdings_of(decision.placements)
    assert routes(list(by_node.values()), SHA) == list(decision.placements)


# ---------------------------------------------------------------------------- routes


def test_routes_are_replicas_then_pipelines_that_cover_every_layer() -> None:
    infos = [info(4, models=(model(),)), info(1, stages=(stage(0, 12),)), info(2, stages=(stage(12, 25),)),
             info(3, stages=(stage(25, 30),))]
    assert routes(infos, SHA) == [replica(4), pipeline((1, 0, 12), (2, 12, 25), (3, 25, N))]


def test_a_chain_with_a_gap_is_no_route() -> None:
    infos = [info(1, stages=(stage(0, 12),)), info(2, stages=(stage(13, 30),))]
    assert routes(infos, SHA) == []


def test_routes_prefer_the_fewest_hops_and_use_each_node_once() -> None:
    infos = [info(1, stages=(stage(0, 10),)), info(2, stages=(stage(10, 30),)), info(3, stages=(stage(0, 20),)),
             info(4, stages=(stage(20, 30),)), info(5, stages=(stage(0, 5),))]
    assert routes(infos, SHA) == [pipeline((3, 0, 20), (4, 20, N)), pipeline((1, 0, 10), (2, 10, N))]


def test_a_node_holding_two_stages_serves_one_chain_once() -> None:
    # node01 holds both halves, but a chain uses each node once: no route through it alone.
    infos = [info(1, stages=(stage(0, 15), stage(15, 30))), info(2, stages=(stage(15, 30),))]
    assert routes(infos, SHA) == [pipeline((1, 0, 15), (2, 15, N))]


def test_routes_ignore_another_models_stages_and_need_the_models_layer_count() -> None:
    infos = [info(1, files=(), stages=(stage(0, 15),)), info(2, files=(), stages=(stage(15, 30),))]
    assert routes(infos, SHA) == []  # nobody reports the file: its layer count is unknown
    infos = [info(1, stages=(stage(0, 15, OTHER),)), info(2, stages=(stage(15, 30),))]
    assert routes(infos, SHA) == []


def test_stage_slots_reports_the_slots_of_a_held_stage() -> None:
    node = info(1, stages=(stage(0, 15, slots=3),))
    assert stage_slots(node, SHA, LayerRange(0, 15)) == 3
    assert stage_slots(node, SHA, LayerRange(0, 16)) == 0


# ---------------------------------------------------------------------------- stage shapes


def test_new_stages_load_with_the_decisions_context_and_chunk() -> None:
    peers = [peer(1, 57), peer(2, 57), peer(3, 57)]  # tight: the planner shrinks the context
    decision = decide(peers, PROFILE, Policy(n_ctx=2048), [])
    assert decision.placements and decision.n_ctx < 2048
    shapes = stage_shapes(decision, [info(1), info(2), info(3)], SHA)
    assert shapes == {(s.node_id, s.layers): shape for p, shape in zip(decision.placements, decision.shapes,
                                                                       strict=True) for s in p.stages}
    assert {shape[0] for shape in decision.shapes} == {decision.n_ctx}


def test_a_placement_planned_on_free_nodes_loads_with_the_shape_it_was_sized_for() -> None:
    """A node that joins a running pipeline is planned on its own: when that plan had to shrink
    the context to fit, its stages load shrunk, not with the running pipeline's context."""
    running = pipeline((1, 0, 10), (2, 10, 20), (3, 20, N))
    infos = [info(i, memory_budget=400 * MiB, stages=(stage(a, b, n_ctx=2048, chunk=512),))
             for i, (a, b) in ((1, (0, 10)), (2, (10, 20)), (3, (20, N)))]
    infos += [info(4, memory_budget=57 * MiB), info(5, memory_budget=57 * MiB), info(6, memory_budget=57 * MiB)]
    decision = decide(capabilities(infos, SHA), PROFILE, Policy(n_ctx=2048, strategy="auto"), [running],
                      may_switch=False)
    assert decision.change == "extend" and len(decision.placements) == 2
    shapes = stage_shapes(decision, infos, SHA)
    extra = decision.placements[1]
    assert {shapes[(s.node_id, s.layers)] for s in extra.stages} == {decision.shapes[1]}
    assert decision.shapes[1][0] < 2048  # shrunk to fit the small nodes
    assert {shapes[(s.node_id, s.layers)] for s in running.stages} == {(2048, 512)}


def test_a_repaired_pipeline_loads_its_new_stage_with_the_shape_the_survivors_stream_with() -> None:
    broken = pipeline((1, 0, 10), (2, 10, 20), (3, 20, N))
    infos = [info(1, memory_budget=100 * MiB, stages=(stage(0, 10, n_ctx=1024, chunk=256),)),
             info(2, memory_budget=100 * MiB, stages=(stage(10, 20, n_ctx=1024, chunk=128),)),
             info(4, memory_budget=100 * MiB)]
    decision = decide(capabilities(infos, SHA), PROFILE, Policy(n_ctx=512), [], broken=[broken])
    assert decision.change == "repair"
    shapes = stage_shapes(decision, infos, SHA)
    assert shapes[(NodeId("node04"), LayerRange(20, N))] == (1024, 128)
    assert set(shapes.values()) == {(1024, 128)}


def test_replicas_have_no_stage_shape() -> None:
    decision = decide([peer(1, 400)], PROFILE, Policy(n_ctx=512), [])
    assert decision.placements == (replica(1),)
    assert stage_shapes(decision, [info(1)], SHA) == {}


def test_a_kept_placement_whose_load_failed_is_retried_with_the_shape_it_was_planned_with() -> None:
    """Kept placements carry no shape of their own (their stages keep theirs); one that never
    finished loading takes the shape an earlier decision sized it for."""
    planned = pipeline((1, 0, 10), (2, 10, 20), (3, 20, N))
    infos = [info(1, memory_budget=100 * MiB), info(2, memory_budget=100 * MiB), info(3, memory_budget=100 * MiB)]
    kept = decide(capabilities(infos, SHA), PROFILE, Policy(n_ctx=2048), [planned], may_switch=False)
    assert kept.placements == (planned,) and kept.shapes == (AS_HELD,)
    shapes = stage_shapes(kept, infos, SHA, {planned: (1024, 128)})
    assert set(shapes.values()) == {(1024, 128)}
    assert set(stage_shapes(kept, infos, SHA).values()) == {(kept.n_ctx, 512)}  # nothing remembered
