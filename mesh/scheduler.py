"""Admission, routing and sessions.

The scheduler turns the membership view into placements (whole-model replicas, and
pipelines of loaded stages: see mesh.placement.routes), admits a request onto the placement
with the least outstanding work that still has capacity (when every one is full, the
request waits its turn in the admission queue, mesh.admission), and keeps the session's token
history. A placement that fails before the first token is replaced once by another; one
that fails mid-stream is replaced by replaying the history (prompt plus tokens already
sent) onto another placement, and because sampling depends only on (logits, params,
seed, position) and replay evaluates tokens as they were first evaluated, the stream
goes on as if nothing happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from mesh.admission import AdmissionQueue
from mesh.config import Timeouts
from mesh.errors import CapacityExhausted, InvalidInput, NotFound, PeerError, Unavailable
from mesh.membership import Membership
from mesh.metrics import GatewayMetrics
from mesh.placement.routes import routable, stage_slots
from mesh.types import (
    ActivationDType,
    EmbedBatch,
    Embeddings,
    FinishReason,
    GenerationRequest,
    ModelSha,
    NodeId,
    NodeInfo,
    PipelineHop,
    PipelineJob,
    Placement,
    TokenEvent,
)

log = logging.getLogger(__name__)

FIRST_TOKEN_RETRIES = 1  # another node is tried once when the first one fails before any token
REPICK_PAUSE_S = 0.2  # a failover whose replacement moved or was full looks again after this
# A request whose placement a re-plan moved as it started waits this long for the new one to be
# loaded (a stage's load takes seconds), looking every MOVED_POLL_S, before a 503.
MOVED_WAIT_S = 30.0
MOVED_POLL_S = 0.5
MIDSTREAM_FAILOVERS = 3  # replays onto another replica after tokens were already sent
EMBED_ATTEMPTS = 3  # replicas an embedding batch is tried on
NO_EMBEDDER = ("no node can compute embeddings: only a node holding the whole model (a replica) embeds, "
               "and no replica of this model is ready (pipeline stages do not embed)")


@dataclass(frozen=True)
class Route:
    node_ids: tuple[NodeId, ...]

    def header(self) -> str:
        return ",".join(self.node_ids)


Failure = tuple[Placement, NodeId | None]  # a placement that failed, and which of its nodes (when known)


@dataclass(frozen=True)
class Attachment:
    """A request's stream opened on a placement, with its first token already received."""

    placement: Placement
    stream: AsyncIterator[TokenEvent]
    first: TokenEvent


@dataclass(frozen=True)
class AttachPolicy:
    """How the attach loop treats failed attempts: a request's first placement and a mid-stream
    failover share the loop and differ only in these."""

    retries: int  # failed attempts (a node error, or a full placement when full_excludes) tolerated
    moved_retries: int  # failed attempts tolerated when the last one found the placement moved
    pause_s: float  # wait before looking again after a move (a re-plan may still be loading)
    full_excludes: bool  # a full placement is left out and counted a failure; else waited out like a move
    blame_unknown: bool  # a pipeline error naming no stage marks every stage down (else none)
    count_retries: bool  # each failed attempt counts in retries{moved,capacity,node_error}
    # After a move, how long nothing being ready is waited out (the re-plan that moved it is
    # still loading) before Unavailable; 0: at once.
    moved_wait_s: float = 0.0
    # When every placement is full, wait in the gateway's admission queue (mesh.admission) rather
    # than refuse at once.
    queues: bool = False
    exhausted: str | None = None  # Unavailable(this) when attempts run out; None: the last error itself
    no_placement: str | None = None  # Unavailable(this: why) when nothing is left; None: pick's error itself

    def give_up(self, last: Exception) -> Exception:
        if self.exhausted is not None:
            return Unavailable(self.exhausted)
        if isinstance(last, NotFound):
            return Unavailable(f"the placement kept moving while this request started: {last}")
        return last


# Before the first token: one other placement; a move (a re-plan under way) is looked at once more.
FIRST_PLACEMENT = AttachPolicy(retries=FIRST_TOKEN_RETRIES, moved_retries=FIRST_TOKEN_RETRIES + 1, pause_s=0.0,
                               full_excludes=True, blame_unknown=False, count_retries=True,
                               moved_wait_s=MOVED_WAIT_S, queues=True)
# Mid-stream: the replacement may be full or moving for a moment (others fail over at the same
# time), so those are waited out; the session counts the failover itself, once.
MIDSTREAM = AttachPolicy(retries=MIDSTREAM_FAILOVERS - 1, moved_retries=MIDSTREAM_FAILOVERS - 1,
                         pause_s=REPICK_PAUSE_S, full_excludes=False, blame_unknown=True, count_retries=False)


class Replanner(Protocol):
    """The gateway's placement controller, as the scheduler uses it after a failure."""

    # A round is loading parts of its plan (a first placement, or a switch that released the
    # old one first because the new one did not fit beside it).
    loading: bool

    async def replan(self, reason: str, timeout_s: float = 30.0) -> None: ...


class Scheduler:
    def __init__(self, membership: Membership, model_sha256: ModelSha, metrics: GatewayMetrics,
                 timeouts: Timeouts | None = None, activation_dtype: ActivationDType = "f32") -> None:
        self._membership = membership
        self._model_sha = model_sha256
        self._metrics = metrics
        self._timeouts = timeouts or Timeouts()
        self._activation_dtype = activation_dtype  # how a pipeline's stages hand on hidden states
        self._outstanding: dict[NodeId, int] = {}
        self._queue = AdmissionQueue()
        self._failing_over = 0  # mid-stream failovers attaching now
        metrics.queued.set_function(lambda: len(self._queue))
        self.replanner: Replanner | None = None  # set by the gateway (mesh.placement.controller)

    # ------------------------------------------------------------------ placements

    def _infos(self) -> dict[NodeId, NodeInfo]:
        return {m.info.node_id: m.info for m in self._membership.ready() if m.info is not None}

    def placements(self) -> list[Placement]:
        return routable(self._infos().values(), self._model_sha)

    def context_length(self) -> int | None:
        """The smallest context any placement serves the model with (None: no placement)."""
        placements = self.placements()
        if not placements:
            return None
        infos = self._infos()
        sizes = []
        for placement in placements:
            for stage in placement.stages:
                info = infos[stage.node_id]
                if placement.kind == "replica":
                    sizes += [m.n_ctx for m in info.models if m.sha256 == self._model_sha]
                else:  # the context the stage was loaded with (a planner may have shrunk it)
                    sizes += [s.n_ctx or m.n_ctx for s in info.stages for m in info.files
                              if s.model_sha256 == self._model_sha == m.sha256 and s.layers == stage.layers]
        return min(sizes) if sizes else None

    async def serving_context_length(self) -> int | None:
        """Like context_length, but with no placement at all first lets the controller re-plan
        (a pipeline that lost a stage while idle, a node that just joined). While the controller
        is loading a placement, that load is waited for (up to MOVED_WAIT_S): the request is
        answered seconds later rather than refused with "nothing serves this model"."""
        n_ctx = self.context_length()
        if n_ctx is None and self.replanner is not None and self._infos():
            wait_s = MOVED_WAIT_S if self.replanner.loading else self._timeouts.connect_s
            await self.replanner.replan("a request found no placement", timeout_s=wait_s)
            n_ctx = self.context_length()
        return n_ctx

    def outstanding(self, node_id: NodeId) -> int:
        return self._outstanding.get(node_id, 0)

    def capacity(self, placement: Placement) -> int:
        """Sessions a placement takes at once: a replica's slots plus queue; a pipeline's
        smallest stage slot count (stages do not queue: the gateway's admission queue does)."""
        infos = self._infos()
        if placement.kind == "replica":
            info = infos.get(placement.stages[0].node_id)
            return info.capacity if info is not None else 0
        return min((stage_slots(infos[s.node_id], self._model_sha, s.layers) if s.node_id in infos else 0)
                   for s in placement.stages)

    def queue_limit(self, exclude: set[NodeId]) -> int:
        """Requests that may wait in the gateway's queue: what the heads of the pipelines were
        started to queue (`--max-queue`). A replica's queue is its node's, already part of its
        capacity."""
        infos = self._infos()
        return sum(infos[p.node_ids[0]].max_queue for p in self.placements()
                   if p.kind == "pipeline" and p.node_ids[0] in infos and not exclude.intersection(p.node_ids))

    def _load(self, placement: Placement) -> tuple[float, int]:
        busiest = max(self.outstanding(n) for n in placement.node_ids)
        return busiest / max(self.capacity(placement), 1), busiest

    def _pick(self, exclude: set[NodeId], replicas_only: bool = False) -> Placement:
        """Least outstanding work relative to capacity, skipping full placements and any
        placement that uses an excluded (failed) node. Ties go to the fewest stages, then
        node-id order, so routing is deterministic."""
        candidates = [p for p in self.placements() if not exclude.intersection(p.node_ids)
                      and (p.kind == "replica" or not replicas_only)]
        if not candidates:
            if replicas_only and not exclude:
                raise Unavailable(NO_EMBEDDER)
            if exclude:
                raise Unavailable("no other node can take this request")
            raise Unavailable("no node serving this model is ready; start one with `edgemesh node`")
        open_ones = [p for p in candidates if all(self.outstanding(n) < self.capacity(p) for n in p.node_ids)]
        if not open_ones:
            total = sum(self.capacity(p) for p in candidates)
            raise CapacityExhausted(
                f"all {len(candidates)} placement(s) are at capacity ({total} requests in flight); retry shortly")
        return min(open_ones, key=lambda p: (*self._load(p), len(p.stages), p.node_ids))

    async def embed(self, batch: EmbedBatch) -> Embeddings:
        """Vectors of a batch from the least busy replica; one that fails before answering is
        replaced by another (an embedding has no history to replay: it is simply asked again)."""
        tried: set[NodeId] = set()
        for attempt in range(EMBED_ATTEMPTS):
            placement = self._pick(tried, replicas_only=True)
            node_id = placement.node_ids[0]
            client = self._membership.client_for(node_id)
            self._reserve(placement)
            try:
                if client is None:
                    raise PeerError(f"node {node_id} has no connection")
                return await client.embed(replace(batch, model_sha256=placement.model_sha256))
            except (PeerError, CapacityExhausted, NotFound) as exc:
                tried.add(node_id)
                if isinstance(exc, PeerError):
                    self.blame(node_id, str(exc))
                if attempt + 1 == EMBED_ATTEMPTS:
                    raise
                log.warning("embeddings %s: %s failed (%s); asking another replica", batch.request_id,
                            self.name_of(node_id), exc)
                self._metrics.retries.labels("node_error" if isinstance(exc, PeerError) else "capacity").inc()
            finally:
                self.release(placement)
        raise AssertionError("unreachable")  # the loop returns or raises

    # ------------------------------------------------------------------ sessions

    async def open(self, request: GenerationRequest) -> Session:
        """Admit a request and wait for its first token; raises if nothing can serve it."""
        session = Session(self, request)
        await session.start()
        return session

    def name_of(self, node_id: NodeId) -> str:
        return self._membership.name_of(node_id)

    def blame(self, node_id: NodeId, why: str) -> None:
        """A call to the node failed: route nothing to it until membership sees it answer again."""
        self._membership.mark_down(node_id, why)

    def _reserve(self, placement: Placement) -> None:
        for node_id in placement.node_ids:
            self._outstanding[node_id] = self.outstanding(node_id) + 1
            self._metrics.node_in_flight.labels(node_id).set(self._outstanding[node_id])

    def release(self, placement: Placement) -> None:
        """A stream (or an embedding call) on the placement ended: its nodes have one less in flight."""
        for node_id in placement.node_ids:
            self._outstanding[node_id] = max(0, self.outstanding(node_id) - 1)
            self._metrics.node_in_flight.labels(node_id).set(self._outstanding[node_id])
        self._queue.wake()

    async def _admit(self, excluded: set[NodeId], failed: Failure | None, policy: AttachPolicy) -> Placement:
        """A placement for the request, waiting in the admission queue when all are full and
        the policy queues."""
        if not policy.queues:
            return await self.pick_or_repair(excluded, failed)

        limit = self.queue_limit(excluded)

        async def pick() -> Placement:
            if self._failing_over and limit:
                # A stream that lost its node goes first: a new request waits rather than take
                # the session its replay needs on the repaired pipeline. (With no queue, as on
                # replicas alone, nobody is held back.)
                raise CapacityExhausted("a failover in progress goes first")
            return await self.pick_or_repair(excluded, failed)

        return await self._queue.admit(pick, limit, self._timeouts.first_token_s, self._metrics.queue_wait.observe)

    def _runner(self, placement: Placement, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        clients = [self._membership.client_for(n) for n in placement.node_ids]
        missing = [n for n, c in zip(placement.node_ids, clients, strict=True) if c is None]
        if missing:
            raise PeerError(f"node {missing[0]} has no connection")
        ready = [c for c in clients if c is not None]
        if placement.kind == "replica":
            return ready[0].generate(request)
        # The head (stage 0's node) drives the later stages itself; see node.pipeline_head.
        hops = tuple(PipelineHop(stage.node_id, client.address, stage.layers)
                     for stage, client in zip(placement.stages, ready, strict=True))
        job = PipelineJob(request=replace(request, model_sha256=placement.model_sha256), stages=hops,
                          n_ctx=self.context_length() or 0, step_timeout_s=self._timeouts.stage_step_s,
                          activation_dtype=self._activation_dtype)
        return ready[0].run_pipeline(job)

    @contextlib.contextmanager
    def failing_over(self) -> Iterator[None]:
        """A stream that lost its node is being moved: until it is, requests that wait in the
        queue (or arrive) do not take a placement (see _admit)."""
        self._failing_over += 1
        try:
            yield
        finally:
            self._failing_over -= 1
            self._queue.wake()

    async def pick_or_repair(self, exclude: set[NodeId], failed: Failure | None) -> Placement:
        """Pick a placement; when none is left after a failure, the placement controller
        re-plans without the failed node (the planner's answer, loaded on the survivors and
        spares) and the pick is made again."""
        try:
            return self._pick(exclude)
        except (Unavailable, CapacityExhausted):
            if failed is None or self.replanner is None:
                raise
            culprit = failed[1] or ",".join(failed[0].node_ids)
            await self.replanner.replan(f"failure of {culprit}")
            return self._pick(exclude)

    async def attach(self, request: GenerationRequest, excluded: set[NodeId], failed: Failure | None,
                     policy: AttachPolicy = FIRST_PLACEMENT) -> Attachment:
        """Pick a placement, open the request's stream on it and wait for its first token,
        trying others as `policy` allows: the one loop behind a request's first placement and
        every mid-stream failover (which passes the replay request and what failed already).
        The attachment holds one in-flight count on its nodes until `release`."""
        excluded = set(excluded)
        failures = 0
        moved_at: float | None = None
        while True:
            try:
                placement = await self._admit(excluded, failed, policy)
            except (Unavailable, CapacityExhausted) as exc:
                if (isinstance(exc, Unavailable) and moved_at is not None
                        and time.monotonic() - moved_at < policy.moved_wait_s):
                    # The placement this request found moved, and its successor is not ready yet.
                    await asyncio.sleep(MOVED_POLL_S)
                    await self._membership.refresh()
                    continue
                if policy.no_placement is None:
                    raise
                raise Unavailable(f"{policy.no_placement}: {exc}") from exc
            try:
                return await self._connect(placement, request)
            except (NotFound, CapacityExhausted, PeerError) as exc:
                failures += 1
                # Moved: the node no longer holds what its last Info said (a re-plan released it a
                # moment ago), or the replacement is full and the policy waits that out. Not a
                # failure of the node: look again and pick afresh.
                moved = isinstance(exc, NotFound) or (isinstance(exc, CapacityExhausted) and not policy.full_excludes)
                culprit = None if moved else _culprit(placement, exc)
                if not moved:
                    excluded.update([culprit] if culprit else placement.node_ids)
                    if isinstance(exc, PeerError):
                        failed = (placement, culprit)
                        self._blame_failure(placement, culprit, exc, policy.blame_unknown)
                    else:  # full, not failed: nothing for the controller to repair
                        failed = None
                if failures > (policy.moved_retries if moved else policy.retries):
                    if (error := policy.give_up(exc)) is exc:
                        raise
                    raise error from exc
                if moved:
                    moved_at = time.monotonic()
                    log.info("request %s: %s cannot take it now (%s); picking again", request.request_id,
                             ",".join(placement.node_ids), exc)
                    if policy.pause_s:
                        await asyncio.sleep(policy.pause_s)
                    await self._membership.refresh()
                else:
                    log.warning("request %s: %s failed before the first token (%s); trying another",
                                request.request_id, culprit or ",".join(placement.node_ids), exc)
                if policy.count_retries:
                    self._metrics.retries.labels(
                        "moved" if moved else "capacity" if isinstance(exc, CapacityExhausted) else "node_error").inc()

    def _blame_failure(self, placement: Placement, culprit: NodeId | None, exc: PeerError, everyone: bool) -> None:
        """Mark the failed node down; an error that names none blames every node of the
        placement when `everyone` (else none: they may all be fine)."""
        for node_id in [culprit] if culprit else (placement.node_ids if everyone else ()):
            self.blame(node_id, str(exc))

    async def _connect(self, placement: Placement, request: GenerationRequest) -> Attachment:
        self._reserve(placement)
        try:
            stream = self._runner(placement, request)
            first = await stream.__anext__()
        except StopAsyncIteration:
            self.release(placement)
            raise PeerError(f"{','.join(placement.node_ids)} ended the stream without a token") from None
        except BaseException:
            self.release(placement)
            if "stream" in locals():
                await stream.aclose()  # type: ignore[attr-defined]
            raise
        return Attachment(placement, stream, first)

    def failover_detected(self, silent_s: float) -> None:
        """A stream broke `silent_s` after its last good token (how long detection took)."""
        self._metrics.failover_detect.observe(silent_s)

    def failover_done(self, failed: Placement | None, now: Placement, what: str, took_s: float,
                      replayed: int) -> None:
        """A broken stream goes on on `now` after `took_s`, with `replayed` tokens replayed."""
        self._metrics.failover_recover.observe(took_s)
        self._metrics.retries.labels("midstream_failover").inc()
        self._metrics.failover(failed.kind if failed else "?", now.kind, "node_error", what)
        self._metrics.replayed_tokens.inc(replayed)


class Session:
    """One request's life: its placement, its token history, its failovers."""

    def __init__(self, scheduler: Scheduler, request: GenerationRequest) -> None:
        self._s = scheduler
        self.request = request
        self.generated: list[int] = []
        self.nodes: list[NodeId] = []
        self.finish_reason: FinishReason | None = None
        self._stream: AsyncIterator[TokenEvent] | None = None
        self._placement: Placement | None = None
        self._first: TokenEvent | None = None
        self._last_event_at = time.monotonic()

    @property
    def route(self) -> Route:
        return Route(tuple(self.nodes))

    async def start(self) -> None:
        self._hold(await self._s.attach(self.request, set(), None, FIRST_PLACEMENT))

    def _hold(self, attached: Attachment) -> None:
        self._stream, self._placement, self._first = attached.stream, attached.placement, attached.first
        self.nodes.extend(n for n in attached.placement.node_ids if n not in self.nodes)

    async def _release(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()  # type: ignore[attr-defined]
            self._stream = None
        if self._placement is not None:
            self._s.release(self._placement)
            self._placement = None

    async def events(self) -> AsyncGenerator[TokenEvent, None]:
        """Every token of the request, failing over mid-stream by replay."""
        failovers = 0
        try:
            while True:
                try:
                    if self._first is not None:
                        first, self._first = self._first, None
                        yield self._accept(first)
                        if first.finish_reason:
                            return
                    assert self._stream is not None
                    async for event in self._stream:
                        yield self._accept(event)
                        if event.finish_reason:
                            return
                    raise PeerError("stream ended without a finish reason")
                except PeerError as exc:
                    failovers += 1
                    if failovers > MIDSTREAM_FAILOVERS:
                        raise
                    await self._failover(exc)
        finally:
            await self._release()

    def _accept(self, event: TokenEvent) -> TokenEvent:
        expected = len(self.request.prompt_tokens) + len(self.generated)
        if event.position != expected:
            raise PeerError(f"node sent position {event.position}, expected {expected}", retryable=False)
        self.generated.append(event.token_id)
        self.finish_reason = event.finish_reason
        self._last_event_at = time.monotonic()
        return event

    async def _failover(self, cause: PeerError) -> None:
        detected_at = time.monotonic()
        self._s.failover_detected(detected_at - self._last_event_at)
        failed = self._placement
        culprit = _culprit(failed, cause) if failed else None
        name = self._s.name_of
        who = name(culprit) if culprit else (",".join(name(n) for n in failed.node_ids) if failed else "?")
        log.warning("request %s: %s failed after %d tokens (%s); replaying on another placement",
                    self.request.request_id, who, len(self.generated), cause)
        with self._s.failing_over():
            attached = await self._reattach(failed, culprit, cause)
        self._hold(attached)
        self._s.failover_done(failed, attached.placement, f"{who} failed after {len(self.generated)} tokens",
                              time.monotonic() - detected_at, len(self.generated))

    async def _reattach(self, failed: Placement | None, culprit: NodeId | None, cause: PeerError) -> Attachment:
        await self._release()
        # Mid-stream, a pipeline error that names no stage leaves the whole pipeline out.
        excluded = {culprit} if culprit else set(failed.node_ids if failed else ())
        for node_id in excluded:
            self._s.blame(node_id, str(cause))
        replay = replace(self.request, replay_tokens=tuple(self.generated))
        policy = replace(MIDSTREAM, no_placement=f"no capacity left to continue after {culprit or 'a node'} failed",
                         exhausted=f"no placement could continue request {self.request.request_id}")
        try:
            return await self._s.attach(replay, excluded, (failed, culprit) if failed else None, policy)
        except Unavailable as exc:
            raise exc from cause


def _culprit(placement: Placement, exc: Exception) -> NodeId | None:
    """Which node of a placement an error came from (errors name the address they came from)."""
    return getattr(exc, "node_id", None) or (placement.node_ids[0] if len(placement.node_ids) == 1 else None)


def check_model(requested: str | None, served: str, aliases: frozenset[str] = frozenset()) -> None:
    if requested and requested not in (served, "default") and requested not in aliases:
        names = ", ".join(repr(n) for n in (served, *sorted(aliases)))
        raise NotFound(f"model {requested!r} is not served here; available: {names}")


def check_prompt(n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise InvalidInput("the prompt is empty")
    if n_prompt >= n_ctx:
        raise InvalidInput(f"the prompt is {n_prompt} tokens; the context holds {n_ctx} "
                           "(including at least one generated token)")
