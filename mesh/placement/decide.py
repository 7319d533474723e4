"""Which placement the controller holds: the pure decision between what runs and a fresh plan.

    decide(peers, profile, policy, current, may_switch) -> Decision

What already runs is kept whenever it is a valid placement (every node ready, layers
covered): a gateway that starts later adopts it instead of reloading, and streams in
flight are never disturbed. Nodes it leaves free are planned on their own (a node that
joins becomes a replica, a second pipeline or a spare). The whole fresh plan replaces it
only when it cuts the time of a token by more than IMPROVEMENT, or serves more placements,
and `may_switch` (the controller spaces such voluntary switches apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from mesh.placement.planner import (
    ModelProfile,
    PeerCapability,
    Plan,
    Policy,
    effective_speeds,
    plan,
    substitute,
    token_seconds,
)
from mesh.types import NodeId, Placement

IMPROVEMENT = 0.10  # a fresh plan must be this much faster per token to replace a running one


@dataclass(frozen=True)
class Decision:
    placements: tuple[Placement, ...]
    spares: tuple[NodeId, ...]
    change: str  # keep | initial | extend | repair | replan | better | capacity | none
    plan: Plan  # the planner's own answer for every peer (its reasons explain the roles)
    roles: tuple[tuple[NodeId, str], ...]
    n_ctx: int
    prefill_chunk: int


def best_token_seconds(placements: Sequence[Placement], peers: Sequence[PeerCapability], n_layers: int) -> float:
    speeds = effective_speeds(peers)
    return min((token_seconds(p, speeds, n_layers) for p in placements), default=float("inf"))


def decide(peers: Sequence[PeerCapability], profile: ModelProfile, policy: Policy,
           current: Sequence[Placement], may_switch: bool = True, broken: Sequence[Placement] = ()) -> Decision:
    """`current`: placements to keep (all their nodes ready); `broken`: pipelines that lost
    a node, which free peers may repair by taking the lost stages whole."""
    if broken and policy.stages > sum(1 for p in peers if p.has_file):
        # After a failure an asked-for shape may no longer exist: the survivors still serve.
        policy = replace(policy, stages=sum(1 for p in peers if p.has_file))
    fresh = plan(peers, profile, policy)
    planned = dict(fresh.roles)
    roles: dict[NodeId, str] = {}
    # Lost stages are sized as the fresh plan sizes stages (it may have shrunk the context to fit).
    sized = replace(policy, n_ctx=fresh.n_ctx, prefill_chunk=fresh.prefill_chunk) if fresh.feasible else policy
    repaired = _repair(peers, profile, sized, current, broken)
    lost = {n for b in broken for n in b.node_ids}
    for p in repaired:
        for index, s in enumerate(p.stages):
            roles[s.node_id] = (f"stage {index + 1}/{len(p.stages)}: layers [{s.layers.first}, "
                                f"{s.layers.last_exclusive})" + ("" if s.node_id in lost or
                                                                 any(s in b.stages for b in broken)
                                                                 else " (took over from a node that failed)"))
    if not current and not repaired:
        change = ("replan" if broken else "initial") if fresh.feasible else "none"
        return _decision(fresh.placements, peers, fresh, change, planned, fresh.n_ctx, fresh.prefill_chunk)
    fresh_stages = {(s.node_id, s.layers, p.kind) for p in fresh.placements for s in p.stages}
    for p in current:
        for index, s in enumerate(p.stages):
            if (s.node_id, s.layers, p.kind) in fresh_stages:
                roles[s.node_id] = planned[s.node_id]  # what runs is what the planner would choose
            else:
                roles[s.node_id] = ("replica (kept: it already serves the whole model)" if p.kind == "replica" else
                                    f"stage {index + 1}/{len(p.stages)}: layers [{s.layers.first}, "
                                    f"{s.layers.last_exclusive}) (kept: it runs, and a fresh plan is not "
                                    f"{IMPROVEMENT:.0%} faster)")
    kept = [*current, *repaired]
    used = {n for p in kept for n in p.node_ids}
    n_ctx, chunk = fresh.n_ctx, fresh.prefill_chunk
    free = [p for p in peers if p.node_id not in used]
    change = "repair" if repaired else "keep"
    if free and policy.strategy != "pipeline":  # an explicit pipeline is one pipeline; the rest stand by
        extra = plan(free, profile, policy)
        if extra.feasible:
            kept += extra.placements
            roles.update((n, r) for n, r in extra.roles if any(n in p.node_ids for p in extra.placements))
            change = "repair" if repaired else "extend"
    if may_switch and fresh.feasible and not repaired:
        faster = best_token_seconds(fresh.placements, peers, profile.n_layers) < \
            (1 - IMPROVEMENT) * best_token_seconds(kept, peers, profile.n_layers)
        if faster or len(fresh.placements) > len(kept):
            return _decision(fresh.placements, peers, fresh, "better" if faster else "capacity", planned,
                             n_ctx, chunk)
    return _decision(tuple(kept), peers, fresh, change, roles, n_ctx, chunk)


def _repair(peers: Sequence[PeerCapability], profile: ModelProfile, policy: Policy,
            current: Sequence[Placement], broken: Sequence[Placement]) -> list[Placement]:
    used = {n for p in current for n in p.node_ids}
    repaired: list[Placement] = []
    ready = {p.node_id for p in peers}
    for placement in broken:
        if placement.kind != "pipeline":
            continue
        survivors = {n for n in placement.node_ids if n in ready}
        if survivors & used:
            continue
        candidates = [p for p in peers if p.node_id not in used or p.node_id in survivors]
        fixed = substitute(placement, candidates, profile, policy)
        if fixed is not None:
            repaired.append(fixed)
            used |= set(fixed.node_ids)
    return repaired


def _decision(placements: Sequence[Placement], peers: Sequence[PeerCapability], fresh: Plan, change: str,
              roles: dict[NodeId, str], n_ctx: int, chunk: int) -> Decision:
    used = {n for p in placements for n in p.node_ids}
    spares = tuple(sorted(p.node_id for p in peers if p.node_id not in used))
    planner_roles = dict(fresh.roles)
    for node in spares:
        reason = planner_roles.get(node, "")
        roles[node] = reason if not reason.startswith(("replica", "stage")) else \
            "spare: the placements that run already cover the model; takes over when a node fails"
    return Decision(tuple(placements), spares, change, fresh, tuple(sorted(roles.items())), n_ctx, chunk)
