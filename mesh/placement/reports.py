"""From what nodes report (Info) to what the planner takes: capabilities and a policy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mesh.placement.planner import PeerCapability, Policy
from mesh.types import IDLE_PROBE, ModelSha, NodeInfo


def _file(info: NodeInfo, model_sha: ModelSha) -> tuple[bool, bool]:
    """(can load stages of the model, holds the whole file)."""
    files = [m for m in (*info.files, *info.models) if m.sha256 == model_sha]
    return bool(files), any(not m.shard_copy for m in files)


def capability(info: NodeInfo, model_sha: ModelSha) -> PeerCapability:
    has_file, whole = _file(info, model_sha)
    held = [s.layers.first for s in info.stages if s.model_sha256 == model_sha]
    budget = info.memory_budget or (min(info.memory_limit, info.memory_free) if info.memory_limit
                                    else info.memory_free)
    return PeerCapability(node_id=info.node_id, name=info.name, memory_budget=budget,
                          tokens_per_second=info.decode_tokens_per_second, has_file=has_file,
                          can_replica=whole and not info.stage_only, held_first=min(held, default=-1),
                          speed_settled=info.speed_source == IDLE_PROBE)


def capabilities(infos: Iterable[NodeInfo], model_sha: ModelSha) -> list[PeerCapability]:
    return [capability(i, model_sha) for i in sorted(infos, key=lambda i: i.node_id)]


def policy_for(infos: Sequence[NodeInfo], model_sha: ModelSha, strategy: str, stages: int) -> Policy:
    """The planner's policy from the nodes: the smallest context and stage session count they
    were started with (the planner may shrink the context further to fit their memory)."""
    contexts = [m.n_ctx for i in infos for m in (*i.files, *i.models) if m.sha256 == model_sha and m.n_ctx]
    slots = [i.stage_sessions or i.slots for i in infos if i.stage_sessions or i.slots]
    return Policy(n_ctx=min(contexts, default=2048), sessions_per_stage=max(1, min(slots, default=1)),
                  strategy=strategy, stages=stages)
