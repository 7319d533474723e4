"""`edgemesh plan`: the planner's answer, offline for made-up nodes (--dry-run) or as a live
gateway's controller holds it (--url), with the reason for every node's role."""

from __future__ import annotations

import sys
from typing import Any

from mesh.errors import ConfigError


def print_dry_run(model: str, nodes: int, memory_limit: str, n_ctx: int, strategy: str, stages: int,
                  speeds: tuple[float, ...]) -> None:
    """Plan `nodes` local nodes named node-1..N, each with --memory-limit (or an equal share
    of free memory) and the given speeds, as the gateway's controller would plan them."""
    from mesh.config import parse_bytes
    from mesh.model_store import resolve
    from mesh.placement.planner import PeerCapability, Policy, plan
    from mesh.types import NodeId
    from node.gguf import file_sha256
    from node.probe import memory
    from node.profile import model_profile

    if nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    path = resolve(model)
    limit = parse_bytes(memory_limit)
    budget = limit if limit else memory().free // nodes
    peers = [PeerCapability(NodeId(f"node-{i + 1}"), f"node-{i + 1}", budget, speeds[i] if i < len(speeds) else 0.0)
             for i in range(nodes)]
    # With --strategy pipeline and no --stages, the planner spans every node, as `edgemesh up` asks.
    result = plan(peers, model_profile(path, file_sha256(path)), Policy(n_ctx=n_ctx, strategy=strategy, stages=stages))
    for placement in result.placements:
        sys.stdout.write(f"{placement.kind}: " + ", ".join(
            f"{s.node_id} layers [{s.layers.first}, {s.layers.last_exclusive})" for s in placement.stages) + "\n")
    for spare in result.spares:
        sys.stdout.write(f"spare: {spare}\n")
    if result.feasible and (result.n_ctx, result.prefill_chunk) != (n_ctx, 512):
        sys.stdout.write(f"context {result.n_ctx}, prefill chunks of {result.prefill_chunk} tokens\n")
    sys.stdout.write("roles:\n" + "".join(f"  {node}: {why}\n" for node, why in result.roles))
    sys.stdout.write("why:\n" + "".join(f"  - {reason}\n" for reason in result.reasons))
    if not result.feasible:
        raise ConfigError("no feasible plan")


def format_live_plan(cluster: dict[str, Any]) -> str:
    placement = cluster.get("placement") or {}
    names = {n.get("id"): n.get("name") for n in cluster.get("nodes", [])}
    acting = "places the model" if placement.get("active") else \
        f"routes only; {placement.get('rival') or 'nobody'} holds the nodes' claims"
    lines = [f"controller {placement.get('controller')} ({acting}), strategy {placement.get('strategy')}, "
             f"{'converged' if placement.get('converged') else 'converging'}"]
    for p in placement.get("plan", []):
        lines.append(f"{p['kind']}: " + ", ".join(
            s["name"] if p["kind"] == "replica" else f"{s['name']} [{s['layers'][0]}, {s['layers'][1]})"
            for s in p["stages"]))
    for spare in placement.get("spares", []):
        lines.append(f"spare: {spare['name']}")
    roles = placement.get("roles") or {}
    if roles:
        lines.append("roles:")
        lines += [f"  {names.get(node) or node}: {why}" for node, why in sorted(roles.items(),
                                                                                key=lambda kv: str(names.get(kv[0])))]
    reasons = placement.get("reasons") or []
    if reasons:
        lines.append("why:")
        lines += [f"  - {reason}" for reason in reasons]
    for change in (placement.get("history") or [])[-5:]:
        lines.append(f"change: {change['change']} after {change['trigger']} in {change['seconds']}s: "
                     + ("; ".join(change["plan"]) or "nothing placed"))
    return "\n".join(lines) + "\n"


def print_live_plan(url: str, api_key: str) -> None:
    from mesh.client_cli import fetch_cluster

    sys.stdout.write(format_live_plan(fetch_cluster(url, api_key)))
