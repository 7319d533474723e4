"""The planner: a pure function from peers, a model profile and a policy to a plan.

    plan(peers, profile, policy) -> Plan

Whole-model replicas go on nodes whose memory budget holds the model; the other nodes
form pipelines of contiguous layer ranges, sized in proportion to each node's measured
speed and capped by its memory; nodes left over are spares (they take a failed stage's
layers). No I/O, deterministic, independent of the order peers are given in, and every
decision is written into `Plan.reasons` so `edgemesh plan --dry-run` can explain itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from mesh.types import LayerRange, ModelSha, NodeId, Placement, StagePlacement

# Memory a whole-model llama.cpp replica needs beyond the file and KV cache (compute
# buffers, context), measured for small models; the planner keeps this much headroom.
REPLICA_OVERHEAD_BYTES = 64 * 2**20
# A node started without --slots serves as many streams at once as its memory budget holds,
# up to this many: past 8 rows a step of a small model on a few cores gains little (llama.cpp's
# own batched decode of the default model on 2 cores, 2026-12-04: 8 sequences 1.7x one, 16
# sequences 1.9x), while each slot holds a whole context of KV cache.
AUTO_SLOTS_MAX = 8


@dataclass(frozen=True)
class PeerCapability:
    node_id: NodeId
    name: str
    memory_budget: int  # bytes the node may use: min(free memory, --memory-limit)
    tokens_per_second: float  # measured decode speed (0 = unknown: counted as 1.0)
    has_file: bool = True  # it can load stages from a local copy of the model (or fetch their bytes)
    can_replica: bool = True  # it may serve the whole model (a whole file, not --role stage)
    # The first layer it serves now (-1: none). Among peers of one speed class, incumbents keep
    # their order, so a re-plan moves as few layers as it can.
    held_first: int = -1
    # Its speed comes from an idle probe (mesh.types.IDLE_PROBE): only such speeds compare
    # across nodes, so only they may justify replacing a running placement (decide._better).
    speed_settled: bool = True


# Measured speeds are noisy (devices share cores, probes run while others load); speeds
# within this fraction of the fastest count as equal, so only a node that is much slower
# than its peers gets fewer layers, and noise does not reshuffle stages.
SIMILAR_SPEED = 0.5
# What one hop between stages costs a token, for comparing placements (measured ~0.8 ms on
# loopback, 1-5 ms on Wi-Fi); a replica has none.
HOP_S = 0.002


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


STRATEGIES = ("auto", "replica", "pipeline")


@dataclass(frozen=True)
class Policy:
    n_ctx: int = 2048
    sessions_per_stage: int = 1  # concurrent sessions of a stage, and slots of a replica
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
    # Why each node has its role, one line per node (the cluster page and `edgemesh status`).
    roles: tuple[tuple[NodeId, str], ...] = ()

    @property
    def feasible(self) -> bool:
        return bool(self.placements)


def stage_text(index: int, count: int, layers: LayerRange) -> str:
    """How a stage is named wherever a person reads it."""
    return f"stage {index + 1}/{count}: layers [{layers.first}, {layers.last_exclusive})"


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
    """The file (mapped once), a KV cache of a whole context per slot, and once for all slots
    (they are sequences of one llama.cpp context, node.engines.decode_batch) its buffers."""
    kv = profile.kv_bytes_per_token_layer * policy.n_ctx * profile.n_layers
    return profile.file_bytes + max(1, policy.sessions_per_stage) * kv + REPLICA_OVERHEAD_BYTES


def slots_for_budget(profile: ModelProfile, n_ctx: int, budget: int) -> int:
    """Streams a replica of `profile` serves at once within `budget` bytes: as many as fit,
    from 1 (a node that cannot hold even one still reports one; its load is refused with the
    reason) to AUTO_SLOTS_MAX."""
    fits = [n for n in range(1, AUTO_SLOTS_MAX + 1)
            if replica_bytes(profile, Policy(n_ctx=n_ctx, sessions_per_stage=n)) <= budget]
    return max(fits, default=1)


def effective_speeds(peers: Sequence[PeerCapability]) -> dict[NodeId, float]:
    """Speeds as the planner uses them: unknown speeds count as the fastest known one, and
    speeds within SIMILAR_SPEED of the fastest count as the fastest (see there)."""
    known = [p.tokens_per_second for p in peers if p.tokens_per_second > 0]
    fastest = max(known, default=1.0)
    result = {}
    for p in peers:
        speed = p.tokens_per_second if p.tokens_per_second > 0 else fastest
        result[p.node_id] = fastest if speed >= SIMILAR_SPEED * fastest else speed
    return result


def token_seconds(placement: Placement, speeds: dict[NodeId, float], n_layers: int) -> float:
    """Estimated time of one decode token through a placement: each stage's share of the
    model at its node's speed, plus a hop per later stage."""
    fallback = max(speeds.values(), default=1.0) or 1.0
    compute = sum((s.layers.count / n_layers) / (speeds.get(s.node_id) or fallback) for s in placement.stages)
    return compute + HOP_S * (len(placement.stages) - 1)


def substitute(placement: Placement, peers: Sequence[PeerCapability], profile: ModelProfile,
               policy: Policy) -> Placement | None:
    """A pipeline that lost nodes, with each lost stage's exact layers given to a free peer
    whose memory holds them (fastest first): after a failure this moves the fewest bytes
    (the survivors keep what they hold). None when some lost stage finds no such peer."""
    alive = {p.node_id: p for p in peers}
    used = {s.node_id for s in placement.stages if s.node_id in alive}
    speeds = effective_speeds(peers)
    free = sorted((p for p in peers if p.node_id not in used and p.has_file),
                  key=lambda p: (-speeds[p.node_id], p.node_id))
    stages = []
    for stage in placement.stages:
        if stage.node_id in alive:
            stages.append(stage)
            continue
        fits = [p for p in free if stage_bytes(profile, policy, stage.layers) <= p.memory_budget]
        if not fits:
            return None
        free.remove(fits[0])
        stages.append(StagePlacement(fits[0].node_id, stage.layers))
    return replace(placement, stages=tuple(stages))


class _Room:
    """How many layers from a given first layer fit a memory budget, from prefix sums (the
    planner asks this thousands of times while it searches stage orders)."""

    def __init__(self, profile: ModelProfile, policy: Policy) -> None:
        self._profile, self._policy = profile, policy
        self._prefix = [0]
        for size in profile.layer_bytes:
            self._prefix.append(self._prefix[-1] + size)
        self._kv = profile.kv_bytes_per_token_layer * policy.n_ctx * policy.sessions_per_stage
        self._compute = (compute_bytes(profile, policy, last=False), compute_bytes(profile, policy, last=True))
        self._cache: dict[tuple[int, int], int] = {}

    def bytes(self, first: int, last_exclusive: int) -> int:
        n = self._profile.n_layers
        at_end = last_exclusive == n
        return (self._prefix[last_exclusive] - self._prefix[first] + self._kv * (last_exclusive - first)
                + (self._profile.embed_bytes if first == 0 else 0) + (self._profile.head_bytes if at_end else 0)
                + self._compute[at_end])

    def layers(self, budget: int, first: int) -> int:
        key = (budget, first)
        if key not in self._cache:
            count = 0
            while first + count < self._profile.n_layers and self.bytes(first, first + count + 1) <= budget:
                count += 1
            self._cache[key] = count
        return self._cache[key]


# Stage orders the planner tries in full (5! = 120); beyond, one order: fastest first.
MAX_PERMUTED = 5


def _pipeline(profile: ModelProfile, policy: Policy, peers: Sequence[PeerCapability],
              reasons: list[str]) -> tuple[list[StagePlacement], list[PeerCapability]] | None:
    """The fewest peers (fastest first) whose memory holds the model, in the stage order and
    with the layer counts that make the slowest stage fastest. Returns the stages and the
    peers left unused, or None when the peers cannot hold the model."""
    speeds = effective_speeds(peers)
    order = sorted(peers, key=lambda p: (-speeds[p.node_id], p.node_id))
    wanted = policy.stages or (len(order) if policy.strategy == "pipeline" else 0)
    room = _Room(profile, policy)
    chosen: list[PeerCapability] = []
    for peer in order:
        chosen.append(peer)
        if wanted and len(chosen) < wanted:
            continue
        stages = _arrange(profile, room, chosen, speeds, every_peer=bool(wanted))
        if stages is not None:
            used = {s.node_id for s in stages}
            return stages, [p for p in order if p.node_id not in used]
    reasons.append(f"the {len(order)} node(s) without a replica cannot hold all {profile.n_layers} layers "
                   f"with a context of {policy.n_ctx}")
    return None


def _arrange(profile: ModelProfile, room: _Room, chosen: Sequence[PeerCapability],
             speeds: dict[NodeId, float], every_peer: bool = False) -> list[StagePlacement] | None:
    """The best stage order of the chosen peers: memory decides which can take the first
    stage (the embedding) and the last (the output head). Ties go to the order the peers
    serve in now (held_first), so a re-plan of what runs gives back what runs."""
    if len(chosen) > MAX_PERMUTED:
        orders: Iterable[Sequence[PeerCapability]] = [sorted(
            chosen, key=lambda p: (p.held_first if p.held_first >= 0 else 1 << 30, -speeds[p.node_id], p.node_id))]
    else:
        orders = itertools.permutations(chosen)
    held = {p.node_id: p.held_first if p.held_first >= 0 else 1 << 30 for p in chosen}
    best: tuple[tuple[float, int, tuple[int, ...], tuple[str, ...]], list[StagePlacement]] | None = None
    for candidate in orders:
        stages = _assign(profile, room, candidate, speeds, every_peer)
        if stages is None:
            continue
        slowest = max(s.layers.count / speeds[s.node_id] for s in stages)
        moved = sum(1 for s in stages if held[s.node_id] != s.layers.first)
        # Then incumbents in the order they serve in, newcomers after them, then node ids.
        key = (round(slowest, 9), moved, tuple(held[s.node_id] for s in stages), tuple(s.node_id for s in stages))
        if best is None or key < best[0]:
            best = (key, stages)
    return best[1] if best is not None else None


def _assign(profile: ModelProfile, room: _Room, chosen: Sequence[PeerCapability],
            speeds: dict[NodeId, float], every_peer: bool = False) -> list[StagePlacement] | None:
    """Contiguous ranges over the peers in the given order that make the slowest stage as
    fast as it can be: the smallest bottleneck T (seconds of a token, in units of one
    layer at speed 1) such that each peer, taking at most T x its speed layers and at most
    what its memory holds where it starts, gets the layers to the end. A peer that would
    take no layer is passed over, unless `every_peer` (an asked-for stage count): then each
    takes at least one and leaves one for each peer after it. None when no T covers the model."""
    n = profile.n_layers
    bounds = sorted({k / speeds[p.node_id] for p in chosen for k in range(1, n + 1)})
    if not bounds or _fill(profile, room, chosen, speeds, bounds[-1], every_peer) is None:
        return None
    lo, hi = 0, len(bounds) - 1  # the last bound works; find the first that does
    while lo < hi:
        mid = (lo + hi) // 2
        if _fill(profile, room, chosen, speeds, bounds[mid], every_peer) is None:
            lo = mid + 1
        else:
            hi = mid
    return _fill(profile, room, chosen, speeds, bounds[lo], every_peer)


def _fill(profile: ModelProfile, room: _Room, chosen: Sequence[PeerCapability], speeds: dict[NodeId, float],
          bottleneck: float, every_peer: bool) -> list[StagePlacement] | None:
    stages: list[StagePlacement] = []
    first = 0
    for index, peer in enumerate(chosen):
        if first == profile.n_layers:
            break
        cap = int(bottleneck * speeds[peer.node_id] + 1e-9)
        take = min(cap, room.layers(peer.memory_budget, first))
        if every_peer:
            take = min(take, profile.n_layers - first - (len(chosen) - 1 - index))
        if take < 1:
            if every_peer:
                return None
            continue
        stages.append(StagePlacement(peer.node_id, LayerRange(first, first + take)))
        first += take
    if every_peer and len(stages) < len(chosen):
        return None
    return stages if first == profile.n_layers else None


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
    roles: dict[NodeId, str] = {p.node_id: "has no copy of the model and no peer to fetch it from"
                                for p in peers if not p.has_file}
    for peer in candidates:
        fits = peer.memory_budget >= need and peer.can_replica
        if fits and policy.strategy in ("replica", "auto"):
            roles[peer.node_id] = (f"replica: its {peer.memory_budget / 2**20:.0f} MiB budget holds the whole "
                                   f"model ({need / 2**20:.0f} MiB)")
            placements.append(Placement("replica", profile.sha256, profile.name,
                                        (StagePlacement(peer.node_id, LayerRange(0, profile.n_layers)),)))
            reasons.append(f"{peer.name}: replica ({peer.memory_budget / 2**20:.0f} MiB budget holds the "
                           f"model's {need / 2**20:.0f} MiB)")
            continue
        if not peer.can_replica:
            reasons.append(f"{peer.name}: serves layer ranges only (--role stage, or a shard copy of the file)")
        elif not fits:
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
            by_id = {p.node_id: p for p in peers}
            reasons.append("pipeline: " + ", ".join(
                f"{by_id[s.node_id].name}[{s.layers.first}-{s.layers.last_exclusive})" for s in stages))
            for index, s in enumerate(stages):
                measured = by_id[s.node_id].tokens_per_second
                speed = f"{measured:.0f} tok/s" if measured > 0 else "unmeasured speed"
                roles[s.node_id] = (f"{stage_text(index, len(stages), s.layers)} for a node of {speed} and a "
                                    f"{by_id[s.node_id].memory_budget / 2**20:.0f} MiB budget")
            if policy.strategy == "pipeline":
                break  # one pipeline of the asked shape; the rest stand by
    for peer in rest:
        spares.append(peer.node_id)
        reasons.append(f"{peer.name}: spare")
        roles[peer.node_id] = ("spare: not needed by the placements; takes over when a node fails" if placements
                               else "spare: the nodes together cannot hold the model yet")
    if not placements:
        reasons.append("no placement is possible: add nodes, raise --memory-limit, or lower --n-ctx")
    return Plan(tuple(placements), tuple(sorted(spares)), tuple(reasons), policy.n_ctx, policy.prefill_chunk,
                tuple(sorted(roles.items())))
