"""The placement controller: runs in every gateway, turns node reports into a plan with the
pure planner, and converges the nodes to it with idempotent load and release calls.

A round runs on every membership change (a node joins, leaves, fails or drains), when
the scheduler finds no placement after a failure, and every `interval_s`. Each round:

1. claim the model on every ready node (mesh.placement.claims); a gateway that cannot claim
   them all acts on nothing and only routes to what the nodes hold;
2. decide (mesh.placement.decide): keep what runs, repair it, plan the free nodes, or
   switch to a fresh plan that is clearly better;
3. where a node needs memory for its new part, release what serves no placement there; load
   what is missing (in parallel across nodes); once everything is loaded, release what the
   new placement made redundant (a holding with streams in flight is freed when they end:
   the old placement drains while new requests go to the new one).

A switch whose new parts do not fit beside the running placement is made only while that
placement is idle (it is released first: a moment without a placement, no stream cut);
otherwise it waits for the next chance (`switch_every_s`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.errors import CapacityExhausted, EdgeMeshError
from mesh.membership import Membership
from mesh.metrics import GatewayMetrics
from mesh.placement.claims import ClaimKeeper
from mesh.placement.decide import AS_HELD, Decision, decide
from mesh.placement.holdings import (
    Holding,
    held_by,
    holding_text,
    holdings_of,
    nodes_without_room,
    order,
    stage_shapes,
    whole_file_holders,
)
from mesh.placement.planner import ModelProfile
from mesh.placement.reports import capabilities, policy_for
from mesh.placement.routes import routable
from mesh.types import LayerRange, ModelSha, NodeId, NodeInfo, Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerSettings:
    interval_s: float = 5.0  # a round at least this often
    debounce_s: float = 0.2  # membership changes that come together make one round
    claim_ttl_s: float = 15.0  # a claim not renewed for this long lapses (a vanished gateway)
    load_timeout_s: float = 300.0  # deadline of one LoadStage or LoadModel (a big model, a slow link)
    switch_every_s: float = 30.0  # voluntary switches to a better plan at most this often
    settle_s: float = 2.0  # the first plan waits until membership has been still this long (nodes started together)
    strategy: str = "auto"  # auto | replica | pipeline
    stages: int = 0  # pipeline: stages wanted (0 = as the planner finds)
    acting: bool = True  # False (--no-placement): plan for the view, never claim, load or release


class PlacementController:
    def __init__(self, membership: Membership, profile: ModelProfile, metrics: GatewayMetrics,
                 settings: ControllerSettings | None = None, controller_id: str = "") -> None:
        self.membership = membership
        self.profile = profile
        self.model_sha: ModelSha = profile.sha256
        self.metrics = metrics
        self.settings = settings or ControllerSettings()
        self.controller_id = controller_id or f"gw-{uuid.uuid4().hex[:12]}"
        self.claims = ClaimKeeper(membership, self.model_sha, self.controller_id, self.settings.claim_ttl_s)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_switch = -float("inf")
        self._pending_since: float | None = None  # first trigger not yet answered by a converged round
        self._pending_reason = ""
        self._changed_at = time.monotonic()
        self._round_started = 0.0
        self._served_ctx = 0  # the longest context a placement of ours served: restored after a failure
        self.active = False
        self.decision: Decision | None = None
        # What this controller converges the nodes to, across rounds: a switch in progress is
        # finished, not forgotten, and what nodes still drain is not mistaken for a placement.
        self._target: tuple[Placement, ...] = ()
        self._sized: dict[Placement, tuple[int, int]] = {}  # the shape each target placement was planned with
        self.converged = False
        # True while a round loads parts of its plan: a request that finds no placement then
        # waits for this one instead of being told that nothing serves the model.
        self.loading = False
        self.history: list[dict[str, Any]] = []  # the last changes, newest last

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        if self.settings.acting:
            self.claims.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.claims.stop()

    def poke(self, reason: str = "a node changed") -> None:
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
        """Converge now (a failure, a request with no placement): returns once a round that
        started after this call has run (one round serves every caller waiting meanwhile),
        or, where another gateway places the model, once the nodes' holdings changed; at
        most `timeout_s` either way (the round itself goes on)."""
        self.poke(reason)
        requested = time.monotonic()
        await self.membership.refresh()
        before = held_by(self._ready_infos(), self.model_sha)
        deadline = requested + timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(self._round_after(requested)), timeout_s)
        except asyncio.TimeoutError:
            return
        while not self.active and time.monotonic() < deadline:
            if not self._ready_infos():
                # No node is ready, so no other gateway can place anything we could route to:
                # waiting out the timeout only keeps the client from its clear error.
                return
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
            await self._round(urgent)

    async def _round_after(self, requested: float) -> None:
        async with self._lock:
            if self._round_started < requested:  # else a round that saw the change already ran
                await self._round(urgent=True)

    async def _round(self, urgent: bool) -> None:
        started = self._round_started = time.monotonic()
        infos = self._ready_infos()
        # Set once the claims are answered, never cleared first: a status read made while
        # the round awaits them would otherwise show a placing gateway as only routing.
        active = False
        if self.settings.acting:
            active, silent = await self.claims.claim_all(infos)
            infos = [i for i in infos if i.node_id not in silent]
        self.active = active
        peers = capabilities(infos, self.model_sha)
        policy = policy_for(infos, self.model_sha, self.settings.strategy, self.settings.stages)
        running = routable(infos, self.model_sha)
        ready = {i.node_id for i in infos}
        if not self.active:
            # Only routing: what runs is the nodes' (another gateway, or --no-placement), and
            # our own target is forgotten, so a later take-over starts from what runs then.
            if self.claims.rival or not self.settings.acting:
                self._target, self._sized = (), {}
            self.decision = decide(peers, self.profile, policy, running, may_switch=False,
                                   current_ctx=_context(infos, self.model_sha))
            self.converged = holdings_of(self.decision.placements) <= held_by(infos, self.model_sha)
            return
        target = [p for p in self._target if ready.issuperset(p.node_ids)]
        broken = [p for p in self._target if not ready.issuperset(p.node_ids)]
        # Keep our own target while its nodes live; otherwise adopt what the nodes hold
        # (a gateway that restarted, or took over from another one).
        current = target if target or broken else running
        may_switch = started - self._last_switch >= self.settings.switch_every_s
        decision = decide(peers, self.profile, policy, current, may_switch, broken, _context(infos, self.model_sha),
                          self._served_ctx)
        unsettled = self.settings.settle_s - (started - self._changed_at)
        if decision.change == "initial" and unsettled > 0 and not urgent:
            # Devices started together join within moments of each other: plan them
            # together rather than place the model on the first one or two.
            self.decision = decision
            asyncio.get_running_loop().call_later(unsettled, self._wake.set)
            return
        release_first = False
        if decision.switch:
            self._last_switch = started
            if nodes_without_room(decision, infos, self.profile):
                if any(i.in_flight for i in infos if i.node_id in {n for p in running for n in p.node_ids}):
                    log.info("placement: a %s plan does not fit beside the running one while it serves; "
                             "keeping the running one for now", decision.change)
                    decision = decide(peers, self.profile, policy, current, False, broken,
                                      _context(infos, self.model_sha), self._served_ctx)
                else:
                    release_first = True  # idle: let the old placement go first
        previous, self.decision, self._target = self.decision, decision, decision.placements
        self._sized = {p: s if s != AS_HELD else self._sized[p] for p, s in zip(decision.placements, decision.shapes,
                                                                                 strict=True)
                       if s != AS_HELD or p in self._sized}
        changed = await self._converge(decision, infos, running, release_first)
        await self.membership.refresh()
        infos = self._ready_infos()
        self.converged = holdings_of(decision.placements) <= held_by(infos, self.model_sha)
        if self.converged and decision.placements:
            self._served_ctx = max(self._served_ctx, _context(infos, self.model_sha))
            await self._release_redundant(decision, infos)
        if changed or _placements(previous) != decision.placements:
            self._record(decision, started, changed)
        if self.converged:
            self._pending_since = None

    # ------------------------------------------------------------------ converging

    async def _converge(self, decision: Decision, infos: Sequence[NodeInfo], running: Sequence[Placement],
                        release_first: bool) -> bool:
        """Load what the decision needs; on a node that needs room for it, first free what
        serves no placement there (or, `release_first`, everything not in the decision)."""
        wanted = holdings_of(decision.placements)
        held = held_by(infos, self.model_sha)
        missing = sorted(wanted - held, key=order)
        if not missing:
            return False
        self.loading = True
        try:
            spare = held - wanted if release_first else held - wanted - holdings_of(running)
            await self._make_room_and_load(decision, infos, spare, missing)
        finally:
            self.loading = False
        return True

    async def _make_room_and_load(self, decision: Decision, infos: Sequence[NodeInfo], spare: set[Holding],
                                  missing: list[Holding]) -> None:
        loading = {node for node, _ in missing}
        for node, layers in sorted(spare, key=order):
            if node in loading:
                await self._release(node, layers)
        by_node: dict[NodeId, list[LayerRange | None]] = {}
        for node, layers in missing:
            by_node.setdefault(node, []).append(layers)
        shapes = stage_shapes(decision, infos, self.model_sha, self._sized)
        addresses = {m.info.node_id: m.address for m in self.membership.ready() if m.info is not None}
        sources = [(n, addresses[n]) for n in whole_file_holders(infos, self.model_sha) if n in addresses]
        await asyncio.gather(*(self._load_all(node, items, shapes, decision.slots, sources)
                               for node, items in by_node.items()))

    async def _load_all(self, node: NodeId, items: list[LayerRange | None], shapes: dict[Holding, tuple[int, int]],
                        slots: int, sources: list[tuple[NodeId, str]]) -> None:
        client = self.membership.client_for(node)
        if client is None:
            return
        for layers in items:
            what = holding_text(layers)
            log.info("placement: loading %s on %s", what, self.membership.name_of(node))
            try:
                if layers is None:
                    await client.load_model(self.model_sha, 0, self.settings.load_timeout_s, self.controller_id)
                else:
                    n_ctx, chunk = shapes[(node, layers)]
                    await client.load_stage(self.model_sha, layers, n_ctx, slots, self.settings.load_timeout_s, chunk,
                                            self.controller_id, tuple(a for n, a in sources if n != node))
            except CapacityExhausted as exc:
                log.info("placement: %s has no room for %s yet: %s", self.membership.name_of(node), what, exc)
                return
            except EdgeMeshError as exc:
                log.warning("placement: loading %s on %s failed: %s", what, self.membership.name_of(node), exc)
                return

    async def _release_redundant(self, decision: Decision, infos: Sequence[NodeInfo]) -> None:
        """Once the decision's placements are all loaded, nodes let go of everything else
        (what still serves a stream is freed when the stream ends); the scheduler then sees
        at once that it is gone."""
        redundant = sorted(held_by(infos, self.model_sha) - holdings_of(decision.placements), key=order)
        for node, layers in redundant:
            await self._release(node, layers)
        if redundant:
            await self.membership.refresh()

    async def _release(self, node: NodeId, layers: LayerRange | None) -> None:
        client = self.membership.client_for(node)
        if client is None:
            return
        what = holding_text(layers)
        try:
            outcome = await client.release_holding(self.model_sha, layers, self.controller_id)
        except EdgeMeshError as exc:
            log.warning("placement: releasing %s on %s failed: %s", what, self.membership.name_of(node), exc)
            return
        when = {"released": "", "pending": " once its streams end", "absent": " (it no longer held it)"}
        log.info("placement: %s releases %s%s", self.membership.name_of(node), what, when[outcome])

    # ------------------------------------------------------------------ what people see

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
        name = self.membership.name_of
        return [f"{p.kind}: " + ", ".join(
            name(s.node_id) if p.kind == "replica" else
            f"{name(s.node_id)} [{s.layers.first}, {s.layers.last_exclusive})" for s in p.stages)
            for p in placements]

    def view(self, context_length: Callable[[], int | None] | None = None) -> dict[str, Any]:
        d = self.decision
        name = self.membership.name_of
        return {
            "controller": self.controller_id,
            "active": self.active,
            "rival": self.claims.rival or None,
            "converged": self.converged,
            "strategy": self.settings.strategy,
            "change": d.change if d else None,
            "plan": [{"kind": p.kind, "stages": [{"node": s.node_id, "name": name(s.node_id),
                                                  "layers": s.layers.as_list()} for s in p.stages]}
                     for p in (d.placements if d else ())],
            "spares": [{"node": n, "name": name(n)} for n in (d.spares if d else ())],
            "roles": {n: r for n, r in (d.roles if d else ())},
            "reasons": list(d.plan.reasons) if d else [],
            "n_ctx": (context_length() if context_length else None) or (d.n_ctx if d else None),
            "history": self.history,
        }


def _context(infos: Sequence[NodeInfo], model_sha: ModelSha) -> int:
    """The smallest context the model's loaded parts serve (0: nothing loaded)."""
    sizes = [s.n_ctx for i in infos for s in i.stages if s.model_sha256 == model_sha and s.n_ctx]
    sizes += [m.n_ctx for i in infos for m in i.models if m.sha256 == model_sha]
    return min(sizes, default=0)


def _placements(decision: Decision | None) -> tuple[Placement, ...]:
    return decision.placements if decision is not None else ()
