"""What nodes hold of a model, against what a decision wants: pure helpers of the controller."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mesh.placement.decide import AS_HELD, Decision
from mesh.placement.planner import ModelProfile, Policy, replica_bytes, stage_bytes
from mesh.types import LayerRange, ModelSha, NodeId, NodeInfo, Placement

Holding = tuple[NodeId, LayerRange | None]  # a node's stage (its layers) or its replica (None)


def holdings_of(placements: Sequence[Placement]) -> set[Holding]:
    return {(s.node_id, None if p.kind == "replica" else s.layers) for p in placements for s in p.stages}


def held_by(infos: Sequence[NodeInfo], model_sha: ModelSha) -> set[Holding]:
    held: set[Holding] = set()
    for info in infos:
        if any(m.sha256 == model_sha for m in info.models):
            held.add((info.node_id, None))
        held.update((info.node_id, s.layers) for s in info.stages if s.model_sha256 == model_sha)
    return held


def holding_text(layers: LayerRange | None) -> str:
    """A holding as log lines name it (`layers` None: the replica)."""
    return "the whole model" if layers is None else f"layers [{layers.first}, {layers.last_exclusive})"


def order(holding: Holding) -> tuple[str, int]:
    node, layers = holding
    return node, -1 if layers is None else layers.first


def stage_shapes(decision: Decision, infos: Sequence[NodeInfo], model_sha: ModelSha,
                 sized: Mapping[Placement, tuple[int, int]] | None = None) -> dict[Holding, tuple[int, int]]:
    """(n_ctx, prefill chunk) to load each missing stage with: the shape its pipeline's stages
    already have (a repaired pipeline keeps the context it streams with), else the one the
    decision sized that placement for, else the one an earlier decision did (`sized`: a kept
    placement whose load failed is retried with the shape it was planned with)."""
    held = {(i.node_id, s.layers): s for i in infos for s in i.stages if s.model_sha256 == model_sha}
    shapes: dict[Holding, tuple[int, int]] = {}
    for placement, planned in zip(decision.placements, decision.shapes, strict=True):
        if placement.kind != "pipeline":
            continue
        present = [held[(s.node_id, s.layers)] for s in placement.stages if (s.node_id, s.layers) in held]
        if any(h.n_ctx for h in present):
            shape = (min(h.n_ctx for h in present if h.n_ctx), min(h.prefill_chunk for h in present))
        else:
            shape = planned if planned != AS_HELD else (sized or {}).get(placement, (decision.n_ctx, 512))
        shapes.update({(s.node_id, s.layers): shape for s in placement.stages})
    return shapes


def whole_file_holders(infos: Sequence[NodeInfo], model_sha: ModelSha) -> list[NodeId]:
    """Ready nodes holding the whole model file: where a node with only a shard copy may fetch
    layers from when its own source has gone."""
    return [i.node_id for i in infos
            if any(f.sha256 == model_sha and not f.shard_copy for f in (*i.files, *i.models))]


def nodes_without_room(decision: Decision, infos: Sequence[NodeInfo], profile: ModelProfile) -> list[NodeId]:
    """Nodes whose new parts of `decision` do not fit their budget beside what they hold now
    (a switch loads the new placement before the old one lets go)."""
    shapes = stage_shapes(decision, infos, profile.sha256)
    wanted = holdings_of(decision.placements)
    short = []
    for info in infos:
        held = sum(s.weight_bytes + s.kv_cache_bytes + s.compute_bytes for s in info.stages)
        if any(m.sha256 == profile.sha256 for m in info.models):
            held += replica_bytes(profile, Policy(n_ctx=info.models[0].n_ctx, sessions_per_stage=info.slots))
        mine = held_by([info], profile.sha256)
        need = 0
        for node, layers in wanted - mine:
            if node != info.node_id:
                continue
            if layers is None:
                need += replica_bytes(profile, Policy(n_ctx=decision.n_ctx, sessions_per_stage=info.slots))
            else:
                n_ctx, chunk = shapes[(node, layers)]
                need += stage_bytes(profile, Policy(n_ctx=n_ctx, sessions_per_stage=decision.slots,
                                                    prefill_chunk=chunk), layers)
        if need and held + need > info.memory_budget:
            short.append(info.node_id)
    return short
