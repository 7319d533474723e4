"""The placement controller: runs in every gateway, turns node reports into a plan with the
pure planner, and converges the nodes to it with idempotent load and release calls.

A round runs on every membership change (a node joins, leaves, fails or drains), when
the scheduler finds no placement after a failure, and every `interval_s`. Each round:

1. claim the model on every ready node (a lease, see node.claims); a gateway that cannot
   claim them all acts on nothing and only routes to what the nodes hold;
2. decide (mesh.placement.decide): keep what runs, plan the free nodes, or switch to a
   fresh plan that is clearly better;
3. release what no placement uses any more and blocks memory, load what is missing (in
   parallel across nodes), then release what the new placement made redundant (a holding
   with streams in flight is freed when they end: the old placement drains).

Two gateways on one LAN: both route to what the nodes hold, and only the holder of every
node's claim converges them. When two gateways hold parts, the one with the lower
controller id keeps going and the other gives its claims up, so one convergence happens,
not two fighting ones; when the holder vanishes its claims expire after `claim_ttl_s` and
the other takes over.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh.errors import CapacityExhausted, EdgeMeshError
from mesh.membership import Membership
from mesh.metrics import GatewayMetrics
from mesh.placement.decide import Decision, decide
from mesh.placement.planner import ModelProfile
from mesh.placement.reports import capabilities, policy_for
from mesh.placement.routes import pipeline_placements, replica_placements
from mesh.types import LayerRange, ModelSha, NodeId, NodeInfo, Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerSettings:
    interval_s: float = 5.0  # a round at least this often (claims are renewed in it)
    debounce_s: float = 0.2  # membership changes that come together make one round
    claim_ttl_s: float = 15.0  # a claim not renewed for this long lapses (a vanished gateway)
    load_timeout_s: float = 300.0  # deadline of one LoadStage or LoadModel (a big model on a slow disk)
    switch_every_s: float = 30.0  # voluntary switches to a better plan at most this often
    settle_s: float = 2.0  # the first plan waits until membership has been still this long (nodes started together)
    strategy: str = "auto"  # auto | replica | pipeline
    stages: int = 0  # pipeline: stages wanted (0 = as the planner finds)


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


def routes(infos: Sequence[NodeInfo], model_sha: ModelSha) -> list[Placement]:
    return replica_placements(infos, model_sha) + pipeline_placements(infos, model_sha)


class PlacementController:
    def __init__(self, membership: Membership, profile: ModelProfile, metrics: GatewayMetrics,
                 settings: ControllerSettings | None = None, controller_id: str = "") -> None:
        self.membership = membership
        self.profile = profile
        self.model_sha: ModelSha = profile.sha256
        self.metrics = metrics
        self.settings = settings or ControllerSettings()
        self.controller_id = controller_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._claimed: set[NodeId] = set()
        self._last_switch = 0.0
        self._pending_since: float | None = None  # first trigger not yet answered by a converged round
        self._changed_at = time.monotonic()
        self._pending_reason = ""
        self.active = False
        self.rival = ""  # the controller that holds claims here, when not us
        self.decision: Decision | None = None
        # What this controller converges the nodes to, across rounds: a switch in progress is
        # finished, not forgotten, and what nodes still drain is not mistaken for a placement.
        self._target: tuple[Placement, ...] = ()
        self.converged = False
        self.history: list[dict[str, Any]] = []  # the last changes, newest last
        self._shard_sources: list[tuple[NodeId, str]] = []
        self.load_calls = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._give_up(set(self._claimed))

    def poke(self, reason: str = "membership changed") -> None:
        """Something changed: run a round soon (changes that come together make one)."""
        if self._pending_since is None:
            self._pending_since, self._pending_reason = time.monotonic(), reason
        self._changed_at = time.monotonic()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.interval_s)
                await asyncio.sleep(self.settings.debounce_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.round()
            except EdgeMeshError as exc:
                log.warning("placement round failed: %s", exc)
            except Exception:  # a bug must not stop placement for good; say so loudly
                log.exception("placement round failed")

    async def replan(self, reason: str, timeout_s: float = 30.0) -> None:
        """Converge now (after a failure): returns once a round has run, or, where another
        gateway places the model, once the nodes' holdings changed or `timeout_s` passed."""
        self.poke(reason)
        await self.membership.refresh()
        before = held_by(self._ready_infos(), self.model_sha)
        await self.round(urgent=True)
        if self.active:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            await self.membership.refresh()
            if held_by(self._ready_infos(), self.model_sha) != before:
                return

    # ------------------------------------------------------------------ one round

    def _ready_infos(self) -> list[NodeInfo]:
        return [m.info for m in self.membership.ready() if m.info is not None]

    async def round(self, urgent: bool = False) -> None:
        """One round (see the module's doc). `urgent`: a request waits on it, so even a first
        plan does not wait for membership to settle."""
        async with self._lock:
            started = time.monotonic()
            infos = self._ready_infos()
            self.active = await self._claim(infos)
            peers = capabilities(infos, self.model_sha)
            policy = policy_for(infos, self.model_sha, self.settings.strategy, self.settings.stages)
            routable = routes(infos, self.model_sha)
            ready = {i.node_id for i in infos}
            target = [p for p in self._target if ready.issuperset(p.node_ids)]
            broken = [p for p in self._target if not ready.issuperset(p.node_ids)]
            # Keep our own target while its nodes live; otherwise adopt what the nodes hold
            # (a gateway that restarted, or took over from another one).
            current = target if self.active and (target or broken) else routable
            may_switch = started - self._last_switch >= self.settings.switch_every_s
            decision = decide(peers, self.profile, policy, current, may_switch, broken)
            previous = self.decision
            self.decision = decision
            if not self.active:
                self.converged = holdings_of(decision.placements) <= held_by(infos, self.model_sha)
                return
            unsettled = self.settings.settle_s - (started - self._changed_at)
            if decision.change == "initial" and unsettled > 0 and not urgent:
                # Devices started together join within moments of each other: plan them
                # together rather than place the model on the first one or two.
                asyncio.get_running_loop().call_later(unsettled, self._wake.set)
                return
            if decision.change in ("better", "capacity"):
                self._last_switch = started
            self._target = decision.placements
            changed = await self._converge(decision, infos, routable)
            await self.membership.refresh()
            infos = self._ready_infos()
            self.converged = holdings_of(decision.placements) <= held_by(infos, self.model_sha)
            if self.converged:
                await self._release_redundant(decision, infos)
            if changed or _shape(previous) != _shape(decision):
                self._record(decision, started, changed)
            if self.converged:
                self._pending_since = None

    async def _claim(self, infos: Sequence[NodeInfo]) -> bool:
        """Claim the model on every ready node; True when this controller may act."""
        async def one(info: NodeInfo) -> tuple[NodeId, bool, str]:
            client = self.membership.client_for(info.node_id)
            if client is None:
                return info.node_id, False, ""
            try:
                granted, holder, _ = await client.claim(self.model_sha, self.controller_id, self.settings.claim_ttl_s)
            except EdgeMeshError as exc:
                log.debug("claim on %s failed: %s", info.name, exc)
                return info.node_id, False, ""
            return info.node_id, granted, holder

        answers = await asyncio.gather(*(one(i) for i in infos))
        self._claimed = {node for node, granted, _ in answers if granted}
        rivals = {holder for _node, granted, holder in answers if not granted and holder}
        self.rival = min(rivals, default="")
        if rivals and min(rivals) < self.controller_id:
            # Another gateway has precedence: let it converge the nodes alone.
            await self._give_up(set(self._claimed))
            return False
        return not rivals and len(self._claimed) == len(infos)

    async def _give_up(self, nodes: set[NodeId]) -> None:
        for node in nodes:
            client = self.membership.client_for(node)
            if client is None:
                continue
            try:
                await client.claim(self.model_sha, self.controller_id, 0.0, give_up=True)
            except EdgeMeshError as exc:  # it lapses after claim_ttl_s anyway
                log.debug("giving up the claim on %s failed: %s", node, exc)
        self._claimed -= nodes

    # ------------------------------------------------------------------ converging

    async def _converge(self, decision: Decision, infos: Sequence[NodeInfo], current: Sequence[Placement]) -> bool:
        """Load what the decision needs; first free what blocks memory and serves nothing."""
        wanted = holdings_of(decision.placements)
        held = held_by(infos, self.model_sha)
        routed = holdings_of(current)
        dead = held - wanted - routed  # serves no routable placement: free it before loading
        for node, layers in sorted(dead, key=_order):
            await self._release(node, layers)
        missing = sorted(wanted - held, key=_order)
        if not missing:
            return bool(dead)
        by_node: dict[NodeId, list[LayerRange | None]] = {}
        for node, layers in missing:
            by_node.setdefault(node, []).append(layers)
        slots = {i.node_id: max(1, i.slots) for i in infos}
        shapes = stage_shapes(decision, infos, self.model_sha)
        self._shard_sources = whole_file_holders(self.membership, self.model_sha)
        results = await asyncio.gather(*(self._load_all(node, items, shapes, slots.get(node, 1))
                                         for node, items in by_node.items()))
        if not all(results) and decision.change in ("better", "capacity"):
            # A switch whose new parts do not fit beside what still serves is given up: a
            # placement that works is never torn down for one that might be faster.
            log.info("placement: the better plan does not fit beside the running one; keeping the running one")
            self._target = tuple(current)
        return True

    async def _load_all(self, node: NodeId, items: list[LayerRange | None],
                        shapes: dict[Holding, tuple[int, int]], slots: int) -> bool:
        client = self.membership.client_for(node)
        if client is None:
            return False
        for layers in items:
            what = "the whole model" if layers is None else f"layers [{layers.first}, {layers.last_exclusive})"
            log.info("placement: loading %s on %s", what, self._name(node))
            self.load_calls += 1
            try:
                if layers is None:
                    await client.load_model(self.model_sha, 0, self.settings.load_timeout_s, self.controller_id)
                else:
                    n_ctx, chunk = shapes[(node, layers)]
                    sources = tuple(a for n, a in self._shard_sources if n != node)
                    await client.load_stage(self.model_sha, layers, n_ctx, slots, self.settings.load_timeout_s, chunk,
                                            self.controller_id, sources)
            except CapacityExhausted as exc:
                log.info("placement: %s has no room for %s yet: %s", self._name(node), what, exc)
                return False
            except EdgeMeshError as exc:
                log.warning("placement: loading %s on %s failed: %s", what, self._name(node), exc)
                return False
        return True

    async def _release_redundant(self, decision: Decision, infos: Sequence[NodeInfo]) -> None:
        """Once the decision's placements are all loaded, nodes let go of everything else
        (what still serves a stream is freed when the stream ends); the scheduler then sees
        at once that it is gone."""
        redundant = sorted(held_by(infos, self.model_sha) - holdings_of(decision.placements), key=_order)
        for node, layers in redundant:
            await self._release(node, layers)
        if redundant:
            await self.membership.refresh()

    async def _release(self, node: NodeId, layers: LayerRange | None) -> None:
        client = self.membership.client_for(node)
        if client is None:
            return
        what = "the whole model" if layers is None else f"layers [{layers.first}, {layers.last_exclusive})"
        try:
            now = await client.release_holding(self.model_sha, layers, self.controller_id)
        except EdgeMeshError as exc:
            log.warning("placement: releasing %s on %s failed: %s", what, self._name(node), exc)
            return
        log.info("placement: %s releases %s%s", self._name(node), what, "" if now else " once its streams end")

    # ------------------------------------------------------------------ what people see

    def _name(self, node: NodeId) -> str:
        for m in self.membership.members():
            if m.info is not None and m.info.node_id == node:
                return m.info.name
        return str(node)

    def _record(self, decision: Decision, started: float, changed: bool) -> None:
        trigger = self._pending_reason or "periodic check"
        since = self._pending_since if self._pending_since is not None else started
        seconds = time.monotonic() - since
        entry = {"at": time.time(), "change": decision.change, "trigger": trigger, "seconds": round(seconds, 2),
                 "loaded": changed, "plan": self.describe(decision.placements)}
        self.history = [*self.history[-9:], entry]
        if changed:
            self.metrics.replans.labels(decision.change).inc()
            self.metrics.placement_converge.labels(decision.change).observe(seconds)
        log.info("placement (%s, after %s, %.2fs): %s", decision.change, trigger, seconds,
                 "; ".join(self.describe(decision.placements)) or "nothing can be placed")

    def describe(self, placements: Sequence[Placement]) -> list[str]:
        return [f"{p.kind}: " + ", ".join(
            self._name(s.node_id) if p.kind == "replica" else
            f"{self._name(s.node_id)} [{s.layers.first}, {s.layers.last_exclusive})" for s in p.stages)
            for p in placements]

    def view(self) -> dict[str, Any]:
        d = self.decision
        return {
            "controller": self.controller_id,
            "active": self.active,
            "rival": self.rival or None,
            "converged": self.converged,
            "strategy": self.settings.strategy,
            "change": d.change if d else None,
            "plan": [{"kind": p.kind, "stages": [{"node": s.node_id, "name": self._name(s.node_id),
                                                  "layers": s.layers.as_list()} for s in p.stages]}
                     for p in (d.placements if d else ())],
            "spares": [{"node": n, "name": self._name(n)} for n in (d.spares if d else ())],
            "roles": {n: r for n, r in (d.roles if d else ())},
            "reasons": list(d.plan.reasons) if d else [],
            "n_ctx": d.n_ctx if d else None,
            "history": self.history,
        }


def whole_file_holders(membership: Membership, model_sha: ModelSha) -> list[tuple[NodeId, str]]:
    """(node, address) of ready nodes holding the whole model file: where a node with only a
    shard copy may fetch layers from when its own source has gone."""
    return [(m.info.node_id, m.address) for m in membership.ready() if m.info is not None
            and any(f.sha256 == model_sha and not f.shard_copy for f in (*m.info.files, *m.info.models))]


def stage_shapes(decision: Decision, infos: Sequence[NodeInfo], model_sha: ModelSha) -> dict[Holding, tuple[int, int]]:
    """(n_ctx, prefill chunk) to load each stage of the decision with: the shape its pipeline's
    stages already have (a repaired pipeline keeps the context it streams with), else the plan's."""
    held = {(i.node_id, s.layers): s for i in infos for s in i.stages if s.model_sha256 == model_sha}
    shapes: dict[Holding, tuple[int, int]] = {}
    for p in decision.placements:
        if p.kind != "pipeline":
            continue
        present = [held[(s.node_id, s.layers)] for s in p.stages if (s.node_id, s.layers) in held]
        shape = (min(h.n_ctx for h in present if h.n_ctx), min(h.prefill_chunk for h in present)) \
            if any(h.n_ctx for h in present) else (decision.n_ctx, decision.prefill_chunk)
        shapes.update({(s.node_id, s.layers): shape for s in p.stages})
    return shapes


def _order(holding: Holding) -> tuple[str, int]:
    node, layers = holding
    return node, -1 if layers is None else layers.first


def _shape(decision: Decision | None) -> tuple[Placement, ...]:
    return decision.placements if decision is not None else ()
