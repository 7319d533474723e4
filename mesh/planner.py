"""The planner: a pure function from peers, a model profile and a policy to a plan.

    plan(peers, profile, policy) -> Plan

Whole-model replicas go on nodes whose memory budget holds the model; the other nodes
form pipelines of contiguous layer ranges, sized in proportion to each node's measured
speed and capped by its memory; nodes left over are spares (they take a failed stage's
layers). No I/O, deterministic, independent of the order peers are given in, and every
decision is written into `Plan.reasons` so `edgemesh plan --dry-run` can explain itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from mesh.types import LayerRange, ModelSha, NodeId, Placement, StagePlacement

# Memory a whole-model llama.cpp replica needs beyond the file and KV cache (compute
# buffers, context), measured for small models; the planner keeps this much headroom.
REPLICA_OVERHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class PeerCapability:
    node_id: NodeId
    name: str
    memory_budget: int  # bytes the node may use: min(free memory, --memory-limit)
    tokens_per_second: float  # measured decode speed (0 = unknown: counted as 1.0)
    has_file: bool = True  # it can load stages from a local copy of the model


@dataclass(frozen=True)
class ModelProfile:
    sha256: ModelSha
    name: str
    file_bytes: int
    layer_bytes: tuple[int, ...]  # weight bytes of each transformer block
    embed_bytes: int  # token embedding (first stage)
    head_bytes: int  # output norm + head (last stage); the embedding again when tied
    kv_bytes_per_token_layer: int  # K and V, f16
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int

    @property
    def n_layers(self) -> int:
        return len(self.layer_bytes)


@dataclass(frozen=True)
class Policy:
    n_ctx: int = 2048
    sessions_per_stage: int = 1
    prefill_chunk: int = 512
    strategy: str = "auto"  # auto | replica | pipeline
    stages: int = 0  # pipeline: stages wanted (0 = as few as memory allows, at least 2 nodes' worth)


@dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...]
    spares: tuple[NodeId, ...]
    reasons: tuple[str, ...]
    n_ctx: int = 2048  # the context and prefill chunk the plan's stages are sized for
    prefill_chunk: int = 512

    @property
    def feasible(self) -> bool:
        return bool(self.placements)


def contiguous_ranges(sizes: Sequence[int]) -> list[LayerRange]:
    """Back-to-back layer ranges of the given sizes, starting at layer 0."""
    ranges, first = [], 0
    for size in sizes:
        ranges.append(LayerRange(first, first + size))
        first += size
    return ranges


def even_split(n_layers: int, parts: int) -> list[LayerRange]:
    """Contiguous ranges as equal as can be; the first ranges take the remainder."""
    return contiguous_ranges([n_layers // parts + (1 if i < n_layers % parts else 0) for i in range(parts)])


def compute_bytes(profile: ModelProfile, policy: Policy, *, last: bool) -> int:
    """The stage engine's compute buffer for its worst step: a prefill chunk attending over
    the whole context (the KQ matrix dominates), plus the FFN activations and, on the last
    stage, one row of logits."""
    chunk = min(policy.prefill_chunk, policy.n_ctx)
    attention = chunk * policy.n_ctx * profile.n_head * 4
    activations = chunk * (3 * profile.n_ff + 4 * profile.n_embd) * 4
    return attention + activations + (profile.n_vocab * 4 if last else 0)


def stage_bytes(profile: ModelProfile, policy: Policy, layers: LayerRange) -> int:
    weights = sum(profile.layer_bytes[layers.first:layers.last_exclusive])
    first, last = layers.first == 0, layers.last_exclusive == profile.n_layers
    weights += (profile.embed_bytes if first else 0) + (profile.head_bytes if last else 0)
    kv = profile.kv_bytes_per_token_layer * policy.n_ctx * policy.sessions_per_stage * layers.count
    return weights + kv + compute_bytes(profile, policy, last=last)


def replica_bytes(profile: ModelProfile, policy: Policy) -> int:
    kv = profile.kv_bytes_per_token_layer * policy.n_ctx * profile.n_layers
    return profile.file_bytes + kv + REPLICA_OVERHEAD_BYTES


def _speed(peer: PeerCapability) -> float:
    return peer.tokens_per_second if peer.tokens_per_second > 0 else 1.0


def _max_layers(profile: ModelProfile, policy: Policy, peer: PeerCapability, first: int) -> int:
    """How many layers starting at `first` fit the peer's budget."""
    count = 0
    while first + count < profile.n_layers and \
            stage_bytes(profile, policy, LayerRange(first, first + count + 1)) <= peer.memory_budget:
        count += 1
    return count


def _pipeline(profile: ModelProfile, policy: Policy, peers: Sequence[PeerCapability],
              reasons: list[str]) -> tuple[list[StagePlacement], list[PeerCapability]] | None:
    """Layers in proportion to speed within each peer's memory, fastest peers first.
    Returns the stages and the peers left unused, or None when the peers cannot hold the model."""
    order = sorted(peers, key=lambda p: (-_speed(p), p.node_id))
    chosen: list[PeerCapability] = []
    # Take peers until their memory could cover every layer (cheap upper bound first).
    for peer in order:
        chosen.append(peer)
        if policy.stages and len(chosen) < policy.stages:
            continue
        stages = _assign(profile, policy, chosen, by_speed=True) or _assign(profile, policy, chosen, by_speed=False)
        if stages is not None:
            used = {s.node_id for s in stages}
            return stages, [p for p in order if p.node_id not in used]
    reasons.append(f"the {len(order)} node(s) without a replica cannot hold all {profile.n_layers} layers "
                   f"with a context of {policy.n_ctx}")
    return None


def _assign(profile: ModelProfile, policy: Policy, chosen: Sequence[PeerCapability],
            by_speed: bool) -> list[StagePlacement] | None:
    """Walk the layers in order; each peer (in the given order) takes its speed share (or,
    when that fails, as much as its memory holds), and the last one must reach the end.
    A peer that cannot hold even one layer where it would start is passed over."""
    total_speed = sum(_speed(p) for p in chosen)
    stages: list[StagePlacement] = []
    first = 0
    for index, peer in enumerate(chosen):
        remaining = profile.n_layers - first
        if remaining == 0:
            break
        room = _max_layers(profile, policy, peer, first)
        if index == len(chosen) - 1 or not by_speed:
            share = remaining
        else:
            share = max(1, round(profile.n_layers * _speed(peer) / total_speed))
            # leave at least one layer for each peer still to come
            share = min(share, remaining - (len(chosen) - 1 - index))
        take = min(share, room)
        if take < 1:
            continue
        stages.append(StagePlacement(peer.node_id, LayerRange(first, first + take)))
        first += take
    if first != profile.n_layers:
        return None
    # A stage that now holds the head must still fit (the head is only known at the end).
    last = stages[-1]
    peer = next(p for p in chosen if p.node_id == last.node_id)
    if stage_bytes(profile, policy, last.layers) > peer.memory_budget:
        return None
    return stages


# Smaller settings to try, in order, when the nodes' memory cannot hold the model as asked:
# first smaller prefill chunks (only prompts get slower), then shorter contexts.
SHRINK_CHUNKS = (512, 128, 32)
SHRINK_CONTEXTS = (2048, 1024, 512, 256)


def plan(peers: Sequence[PeerCapability], profile: ModelProfile, policy: Policy) -> Plan:
    """The plan for `policy`; when nothing fits and the strategy allows pipelines, the same
    with smaller prefill chunks and then shorter contexts, saying so in the reasons."""
    first = _plan(peers, profile, policy)
    if first.feasible or policy.strategy == "replica":
        return first
    for n_ctx in [policy.n_ctx, *(c for c in SHRINK_CONTEXTS if c < policy.n_ctx)]:
        for chunk in (c for c in SHRINK_CHUNKS if c <= policy.prefill_chunk):
            if (n_ctx, chunk) == (policy.n_ctx, policy.prefill_chunk):
                continue
            smaller = replace(policy, n_ctx=n_ctx, prefill_chunk=chunk)
            found = _plan(peers, profile, smaller)
            if found.feasible:
                note = (f"nothing fits with a context of {policy.n_ctx} and {policy.prefill_chunk}-token prefill "
                        f"chunks; planned with a context of {n_ctx} and {chunk}-token chunks")
                return replace(found, reasons=(note, *found.reasons))
    return first


def _plan(peers: Sequence[PeerCapability], profile: ModelProfile, policy: Policy) -> Plan:
    reasons: list[str] = []
    candidates = sorted((p for p in peers if p.has_file), key=lambda p: p.node_id)
    for p in sorted(peers, key=lambda p: p.node_id):
        if not p.has_file:
            reasons.append(f"{p.name}: has no copy of {profile.name}; not planned")
    need = replica_bytes(profile, policy)
    placements: list[Placement] = []
    rest: list[PeerCapability] = []
    for peer in candidates:
        fits = peer.memory_budget >= need
        if fits and policy.strategy in ("replica", "auto"):
            placements.append(Placement("replica", profile.sha256, profile.name,
                                        (StagePlacement(peer.node_id, LayerRange(0, profile.n_layers)),)))
            reasons.append(f"{peer.name}: replica ({peer.memory_budget / 2**20:.0f} MiB budget holds the "
                           f"model's {need / 2**20:.0f} MiB)")
            continue
        if not fits:
            reasons.append(f"{peer.name}: {peer.memory_budget / 2**20:.0f} MiB cannot hold a replica "
                           f"({need / 2**20:.0f} MiB); a pipeline stage at most")
        rest.append(peer)
    spares: list[NodeId] = []
    if policy.strategy != "replica":
        while rest:
            built = _pipeline(profile, policy, rest, reasons)
            if built is None:
                break
            stages, rest = built
            placements.append(Placement("pipeline", profile.sha256, profile.name, tuple(stages)))
            reasons.append("pipeline: " + ", ".join(
                f"{s.node_id}[{s.layers.first}-{s.layers.last_exclusive})" for s in stages))
            if policy.strategy == "pipeline" and policy.stages:
                break  # one pipeline of the asked shape; the rest stand by
    for peer in rest:
        spares.append(peer.node_id)
        reasons.append(f"{peer.name}: spare")
    if not placements:
        reasons.append("no placement is possible: add nodes, raise --memory-limit, or lower --n-ctx")
    return Plan(tuple(placements), tuple(sorted(spares)), tuple(reasons), policy.n_ctx, policy.prefill_chunk)
