"""Where the node actors go and what each does, from Ray's view of the cluster.

Actors go round-robin over the alive Ray nodes (the gateway's own node first); each takes
an equal share of its Ray node's CPU and memory resources, which become its threads and
its memory budget for the planner. Roles then follow the same rules as `edgemesh up`:
explicit pipelines split the layers evenly (or by --split), replicas put the whole model
everywhere, and auto asks the planner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import ConfigError
from mesh.local_mesh import split_layers
from mesh.planner import PeerCapability, Policy, plan
from mesh.types import LayerRange, ModelSha, NodeId

HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives its head node only


@dataclass(frozen=True)
class RayNode:
    node_id: str  # Ray's hex node id
    ip: str
    cpus: float
    memory: int  # Ray's `memory` resource: what Ray lets tasks and actors use on it, in bytes
    is_head: bool = False


@dataclass(frozen=True)
class Slot:
    """One node actor: its index (1-based), its EdgeMesh name, its Ray node and its share."""

    index: int
    name: str
    ray_node: RayNode
    threads: int
    memory_budget: int


@dataclass(frozen=True)
class Roles:
    replicas: frozenset[int]  # slot indices serving the whole model
    pipelines: tuple[tuple[tuple[int, LayerRange], ...], ...]  # (slot index, layers) per stage
    reasons: tuple[str, ...] = ()

    def role(self, index: int) -> str:
        return "replica" if index in self.replicas else "stage"


def alive_nodes(ray_nodes: list[dict[str, Any]]) -> list[RayNode]:
    """`ray.nodes()` -> the alive nodes, head first, then by address and id (deterministic)."""
    nodes = []
    for entry in ray_nodes:
        if not entry.get("Alive"):
            continue
        resources = entry.get("Resources") or {}
        nodes.append(RayNode(node_id=str(entry["NodeID"]), ip=str(entry.get("NodeManagerAddress", "")),
                             cpus=float(resources.get("CPU", 0.0)), memory=int(resources.get("memory", 0)),
                             is_head=HEAD_RESOURCE in resources))
    if not nodes:
        raise ConfigError("the Ray cluster has no alive nodes")
    return sorted(nodes, key=lambda n: (not n.is_head, n.ip, n.node_id))


def assign_slots(nodes: list[RayNode], count: int, threads: int, memory_limit: int) -> list[Slot]:
    """Actor i goes to node i mod len(nodes). `threads` (0 = the Ray node's CPUs shared
    among its actors) and `memory_limit` (0 = its memory resource shared likewise) cap
    each actor's share."""
    if count < 1:
        raise ConfigError("--nodes must be at least 1")
    placed = [nodes[i % len(nodes)] for i in range(count)]
    sharing = {n.node_id: sum(1 for p in placed if p.node_id == n.node_id) for n in nodes}
    slots = []
    for i, node in enumerate(placed):
        share = sharing[node.node_id]
        budget = node.memory // share
        if memory_limit:
            budget = min(budget, memory_limit) if budget else memory_limit
        slots.append(Slot(index=i + 1, name=f"node-{i + 1}", ray_node=node,
                          threads=threads or max(1, int(node.cpus // share)), memory_budget=budget))
    return slots


def plan_roles(slots: list[Slot], model_path: Path, model_sha: ModelSha, strategy: str, stages: int,
               split: tuple[int, ...], n_ctx: int) -> Roles:
    """Which slot does what; the first `stages` slots form an explicit pipeline, the rest stay spare."""
    from node.gguf import inspect as inspect_gguf

    indices = [s.index for s in slots]
    if strategy == "replica":
        return Roles(frozenset(indices), ())
    if strategy == "pipeline":
        stage_count = stages or len(slots)
        if stage_count > len(slots):
            raise ConfigError(f"{stage_count} stages need at least {stage_count} nodes, not {len(slots)}")
        ranges = split_layers(inspect_gguf(model_path).n_layers, stage_count, split)
        return Roles(frozenset(), (tuple(zip(indices[:stage_count], ranges, strict=True)),))
    from node.profile import model_profile

    index_of = {NodeId(s.name): s.index for s in slots}
    peers = [PeerCapability(NodeId(s.name), s.name, s.memory_budget, 0.0) for s in slots]
    planned = plan(peers, model_profile(model_path, model_sha), Policy(n_ctx=n_ctx, strategy="auto", stages=stages))
    if not planned.feasible:
        raise ConfigError("no placement fits Ray's memory resources: " + "; ".join(planned.reasons))
    replicas = frozenset(index_of[p.stages[0].node_id] for p in planned.placements if p.kind == "replica")
    pipelines = tuple(tuple((index_of[s.node_id], s.layers) for s in p.stages)
                      for p in planned.placements if p.kind == "pipeline")
    return Roles(replicas, pipelines, planned.reasons)
