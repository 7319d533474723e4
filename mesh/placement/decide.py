"""Which placement the controller holds: the pure decision between what runs and a fresh plan.

    decide(peers, profile, policy, current, ...) -> Decision

What already runs is kept whenever it is a valid placement (every node ready, layers
covered): a gateway that starts later adopts it instead of reloading, and streams in
flight are never disturbed. A pipeline that lost a node is repaired by giving the lost
stages, whole, to free nodes whose memory holds them. Nodes left free are planned on their
own (a node that joins becomes a replica, another pipeline or a spare). The whole fresh
plan replaces what runs only when `may_switch` (the controller spaces such switches apart)
and it is clearly better: more than IMPROVEMENT faster per token, more placements, back the
longer context the mesh served before a failure shrank it (`restore_ctx`), or the stage count
asked for when what runs has fewer.

"Faster" is judged only on speeds measured alike: every node of both plans must have had an
idle probe. A start-up probe often runs while the device loads or its neighbours probe too
(measured here: 36 tok/s at start-up, 67 idle, on one node), so comparing it with an idle
probe finds a gain that is only noise, and the switch would move stages of a mesh that serves.
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
    stage_text,
    substitute,
    token_seconds,
)
from mesh.types import NodeId, Placement

IMPROVEMENT = 0.10  # a fresh plan must be this much faster per token to replace a running one
AS_HELD = (0, 0)  # the shape of a placement that runs: its stages keep theirs


@dataclass(frozen=True)
class Decision:
    placements: tuple[Placement, ...]
    spares: tuple[NodeId, ...]
    change: str  # keep | initial | extend | repair | replan | better | capacity | context | shape | none
    plan: Plan  # the planner's own answer for every peer (its reasons explain the roles)
    roles: tuple[tuple[NodeId, str], ...]
    # (n_ctx, prefill chunk) to load each placement's missing stages with, in placement order;
    # AS_HELD for what runs (and a repaired pipeline's survivors set it for its new stages).
    shapes: tuple[tuple[int, int], ...]
    slots: int = 1  # sessions per stage
    n_ctx: int = 0  # the smallest context the placements serve

    @property
    def switch(self) -> bool:
        """A voluntary change of what runs, as opposed to keeping, extending or repairing it."""
        return self.change in ("better", "capacity", "context", "shape")


def best_token_seconds(placements: Sequence[Placement], peers: Sequence[PeerCapability], n_layers: int) -> float:
    speeds = effective_speeds(peers)
    return min((token_seconds(p, speeds, n_layers) for p in placements), default=float("inf"))


def decide(peers: Sequence[PeerCapability], profile: ModelProfile, policy: Policy,
           current: Sequence[Placement], may_switch: bool = True, broken: Sequence[Placement] = (),
           current_ctx: int = 0, restore_ctx: int = 0) -> Decision:
    """`current`: placements to keep (all their nodes ready); `broken`: pipelines that lost a
    node; `current_ctx`: the smallest context what runs serves (0: unknown); `restore_ctx`:
    the context the mesh served before (a longer one than now is worth a switch back)."""
    asked = policy.stages
    candidates = sum(1 for p in peers if p.has_file)
    if 0 < candidates < policy.stages:
        # Fewer nodes than the stages asked for (before they all joined, after one failed):
        # the ones there serve; `shape` below restores the asked count when they can.
        policy = replace(policy, stages=candidates)
    fresh = plan(peers, profile, policy)
    fresh_shape = (fresh.n_ctx, fresh.prefill_chunk)
    planned = dict(fresh.roles)
    if not current and not broken:
        change = "initial" if fresh.feasible else "none"
        return _decision(fresh.placements, [fresh_shape] * len(fresh.placements), peers, fresh, change, planned,
                         policy, fresh.n_ctx)
    # Lost stages are sized as the fresh plan sizes stages (it may have shrunk the context to fit).
    sized = replace(policy, n_ctx=fresh.n_ctx, prefill_chunk=fresh.prefill_chunk) if fresh.feasible else policy
    repaired = _repair(peers, profile, sized, current, broken)
    if not current and not repaired:
        change = "replan" if fresh.feasible else "none"
        return _decision(fresh.placements, [fresh_shape] * len(fresh.placements), peers, fresh, change, planned,
                         policy, fresh.n_ctx)

    roles = _kept_roles(current, fresh, _measured_alike([*current, *fresh.placements], peers))
    lost = {n for b in broken for n in b.node_ids}
    for p in repaired:
        for index, s in enumerate(p.stages):
            took_over = s.node_id not in lost and not any(s in b.stages for b in broken)
            roles[s.node_id] = stage_text(index, len(p.stages), s.layers) + \
                (" (took over from a node that failed)" if took_over else "")
    kept = [*current, *repaired]
    shapes = [AS_HELD] * len(current) + [AS_HELD] * len(repaired)  # repaired: the survivors' shape
    change = "repair" if repaired else "keep"
    used = {n for p in kept for n in p.node_ids}
    free = [p for p in peers if p.node_id not in used]
    if free and policy.strategy != "pipeline":  # an explicit pipeline is one pipeline; the rest stand by
        extra = plan(free, profile, policy)
        if extra.feasible:
            kept += extra.placements
            shapes += [(extra.n_ctx, extra.prefill_chunk)] * len(extra.placements)
            roles.update((n, r) for n, r in extra.roles if any(n in p.node_ids for p in extra.placements))
            change = "repair" if repaired else "extend"
    n_ctx = min([current_ctx or fresh.n_ctx, *(c for c, _ in shapes if c)])
    if may_switch and fresh.feasible and not repaired:
        reason = _better(fresh, kept, peers, profile, asked, n_ctx, restore_ctx)
        if reason:
            return _decision(fresh.placements, [fresh_shape] * len(fresh.placements), peers, fresh, reason,
                             planned, policy, fresh.n_ctx)
    return _decision(kept, shapes, peers, fresh, change, roles, policy, n_ctx)


def _better(fresh: Plan, kept: Sequence[Placement], peers: Sequence[PeerCapability], profile: ModelProfile,
            asked_stages: int, kept_ctx: int, restore_ctx: int) -> str:
    """Why the fresh plan should replace what runs ('' when it should not)."""
    if _measured_alike([*kept, *fresh.placements], peers) and \
            best_token_seconds(fresh.placements, peers, profile.n_layers) < \
            (1 - IMPROVEMENT) * best_token_seconds(kept, peers, profile.n_layers):
        return "better"
    if len(fresh.placements) > len(kept):
        return "capacity"
    if kept_ctx and kept_ctx < restore_ctx and fresh.n_ctx > kept_ctx:
        return "context"  # a joining node never triggers it: only a context the mesh had is restored
    longest = max((len(p.stages) for p in kept if p.kind == "pipeline"), default=0)
    if asked_stages and longest < asked_stages and \
            any(len(p.stages) == asked_stages for p in fresh.placements if p.kind == "pipeline"):
        return "shape"
    return ""


def _measured_alike(placements: Sequence[Placement], peers: Sequence[PeerCapability]) -> bool:
    """Every node of `placements` has an idle-probed speed (see the module's doc)."""
    settled = {p.node_id for p in peers if p.speed_settled}
    return all(n in settled for p in placements for n in p.node_ids)


def _kept_roles(current: Sequence[Placement], fresh: Plan, compared: bool) -> dict[NodeId, str]:
    planned = dict(fresh.roles)
    fresh_stages = {(s.node_id, s.layers, p.kind) for p in fresh.placements for s in p.stages}
    roles: dict[NodeId, str] = {}
    for p in current:
        for index, s in enumerate(p.stages):
            if (s.node_id, s.layers, p.kind) in fresh_stages:
                roles[s.node_id] = planned[s.node_id]  # what runs is what the planner would choose
            elif p.kind == "replica":
                roles[s.node_id] = "replica (kept: it already serves the whole model)"
            else:
                why = f"a fresh plan is not {IMPROVEMENT:.0%} faster" if compared else \
                    "speeds are compared once every node has had an idle probe"
                roles[s.node_id] = f"{stage_text(index, len(p.stages), s.layers)} (kept: it runs, and {why})"
    return roles


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


def _decision(placements: Sequence[Placement], shapes: Sequence[tuple[int, int]], peers: Sequence[PeerCapability],
              fresh: Plan, change: str, roles: dict[NodeId, str], policy: Policy, n_ctx: int) -> Decision:
    used = {n for p in placements for n in p.node_ids}
    spares = tuple(sorted(p.node_id for p in peers if p.node_id not in used))
    planner_roles = dict(fresh.roles)
    for node in spares:
        reason = planner_roles.get(node, "")
        roles[node] = reason if not reason.startswith(("replica", "stage")) else \
            "spare: the placements that run already cover the model; takes over when a node fails"
    return Decision(tuple(placements), spares, change, fresh, tuple(sorted(roles.items())), tuple(shapes),
                    max(1, policy.sessions_per_stage), n_ctx)
