"""Where the node actors go and what each does, from Ray's view of the cluster.

Actors go round-robin over the alive Ray nodes (the gateway's own node first); each takes
an equal share of its Ray node's CPU and memory resources, which become its threads and
its memory budget. What each node serves is the gateway's placement controller's decision,
as on any other mesh (mesh.placement.controller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh.errors import ConfigError

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
