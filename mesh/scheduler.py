"""Admission, routing and sessions.

The scheduler turns the membership view into placements (today: one replica per ready
node holding the model; pipelines join with the stage engine), admits a request onto
the placement with the least outstanding work that still has capacity, and keeps the
session's token history. A node that fails before the first token is replaced once by
another; a node that fails mid-stream is replaced by replaying the history (prompt plus
tokens already sent) onto another replica, and because sampling depends only on
(logits, params, seed, position) the stream goes on as if nothing happened.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from mesh.errors import CapacityExhausted, InvalidInput, NotFound, PeerError, Unavailable
from mesh.membership import Membership
from mesh.metrics import GatewayMetrics
from mesh.types import (
    FinishReason,
    GenerationRequest,
    LayerRange,
    ModelSha,
    NodeId,
    Placement,
    StagePlacement,
    TokenEvent,
)

log = logging.getLogger(__name__)

FIRST_TOKEN_RETRIES = 1  # another node is tried once when the first one fails before any token
MIDSTREAM_FAILOVERS = 3  # replays onto another replica after tokens were already sent


@dataclass(frozen=True)
class Route:
    node_ids: tuple[NodeId, ...]

    def header(self) -> str:
        return ",".join(self.node_ids)


class Scheduler:
    def __init__(self, membership: Membership, model_sha256: ModelSha, metrics: GatewayMetrics) -> None:
        self._membership = membership
        self._model_sha = model_sha256
        self._metrics = metrics
        self._outstanding: dict[NodeId, int] = {}

    # ------------------------------------------------------------------ placements

    def placements(self) -> list[Placement]:
        result = []
        for member in self._membership.ready():
            info = member.info
            assert info is not None
            for model in info.models:
                if model.sha256 == self._model_sha:
                    result.append(Placement(
                        kind="replica", model_sha256=model.sha256, model_name=model.name,
                        stages=(StagePlacement(info.node_id, LayerRange(0, model.n_layers)),)))
        return result

    def context_length(self) -> int | None:
        """The smallest context any placement serves the model with (None: no placement)."""
        sizes = [m.n_ctx for member in self._membership.ready() if member.info
                 for m in member.info.models if m.sha256 == self._model_sha]
        return min(sizes) if sizes else None

    def outstanding(self, node_id: NodeId) -> int:
        return self._outstanding.get(node_id, 0)

    def _capacity(self, node_id: NodeId) -> int:
        for member in self._membership.ready():
            if member.info is not None and member.info.node_id == node_id:
                return member.info.capacity
        return 0

    def _pick(self, exclude: set[NodeId]) -> NodeId:
        """Least outstanding work (relative to the node's slots), skipping full nodes."""
        candidates = [p.stages[0].node_id for p in self.placements() if p.stages[0].node_id not in exclude]
        if not candidates:
            if exclude:
                raise Unavailable("no other node can take this request")
            raise Unavailable("no node serving this model is ready; start one with `edgemesh node`")
        open_nodes = [n for n in candidates if self.outstanding(n) < self._capacity(n)]
        if not open_nodes:
            total = sum(self._capacity(n) for n in candidates)
            raise CapacityExhausted(
                f"all {len(candidates)} node(s) are at capacity ({total} requests in flight); retry shortly")
        return min(open_nodes, key=lambda n: (self.outstanding(n) / max(self._capacity(n), 1),
                                              self.outstanding(n), n))

    # ------------------------------------------------------------------ sessions

    async def open(self, request: GenerationRequest) -> Session:
        """Admit a request and wait for its first token; raises if nothing can serve it."""
        session = Session(self, request)
        await session.start()
        return session

    def _reserve(self, node_id: NodeId) -> None:
        self._outstanding[node_id] = self.outstanding(node_id) + 1
        self._metrics.node_in_flight.labels(node_id).set(self._outstanding[node_id])

    def _unreserve(self, node_id: NodeId) -> None:
        self._outstanding[node_id] = max(0, self.outstanding(node_id) - 1)
        self._metrics.node_in_flight.labels(node_id).set(self._outstanding[node_id])


class Session:
    """One request's life: its node, its token history, its failovers."""

    def __init__(self, scheduler: Scheduler, request: GenerationRequest) -> None:
        self._s = scheduler
        self.request = request
        self.generated: list[int] = []
        self.nodes: list[NodeId] = []
        self.finish_reason: FinishReason | None = None
        self._stream: AsyncIterator[TokenEvent] | None = None
        self._node: NodeId | None = None
        self._first: TokenEvent | None = None

    @property
    def route(self) -> Route:
        return Route(tuple(self.nodes))

    async def start(self) -> None:
        tried: set[NodeId] = set()
        attempts = 0
        while True:
            node_id = self._s._pick(tried)
            tried.add(node_id)
            try:
                self._first = await self._connect(node_id, self.request)
                return
            except (PeerError, CapacityExhausted) as exc:
                attempts += 1
                reason = "capacity" if isinstance(exc, CapacityExhausted) else "node_error"
                if isinstance(exc, PeerError):
                    self._s._membership.mark_down(node_id, str(exc))
                if attempts > FIRST_TOKEN_RETRIES:
                    raise
                log.warning("request %s: node %s failed before the first token (%s); trying another",
                            self.request.request_id, node_id, exc)
                self._s._metrics.retries.labels(reason).inc()

    async def _connect(self, node_id: NodeId, request: GenerationRequest) -> TokenEvent:
        client = self._s._membership.client_for(node_id)
        if client is None:
            raise PeerError(f"node {node_id} has no connection")
        self._s._reserve(node_id)
        stream = client.generate(request)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            self._s._unreserve(node_id)
            raise PeerError(f"node {node_id} ended the stream without a token") from None
        except BaseException:
            self._s._unreserve(node_id)
            await stream.aclose()  # type: ignore[attr-defined]
            raise
        self._stream, self._node = stream, node_id
        self.nodes.append(node_id)
        return first

    async def _release_node(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()  # type: ignore[attr-defined]
            self._stream = None
        if self._node is not None:
            self._s._unreserve(self._node)
            self._node = None

    async def events(self) -> AsyncIterator[TokenEvent]:
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
            await self._release_node()

    def _accept(self, event: TokenEvent) -> TokenEvent:
        expected = len(self.request.prompt_tokens) + len(self.generated)
        if event.position != expected:
            raise PeerError(f"node sent position {event.position}, expected {expected}", retryable=False)
        self.generated.append(event.token_id)
        self.finish_reason = event.finish_reason
        return event

    async def _failover(self, cause: PeerError) -> None:
        failed = self._node
        log.warning("request %s: node %s failed after %d tokens (%s); replaying on another node",
                    self.request.request_id, failed, len(self.generated), cause)
        await self._release_node()
        if failed is not None:
            self._s._membership.mark_down(failed, str(cause))
        replay = replace(self.request, replay_tokens=tuple(self.generated))
        node_id = self._s._pick({failed} if failed else set())
        self._first = await self._connect(node_id, replay)
        self._s._metrics.retries.labels("midstream_failover").inc()


def check_model(requested: str | None, served: str) -> None:
    if requested and requested not in (served, "default"):
        raise NotFound(f"model {requested!r} is not served here; available: {served!r}")


def check_prompt(n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise InvalidInput("the prompt is empty")
    if n_prompt >= n_ctx:
        raise InvalidInput(f"the prompt is {n_prompt} tokens; the context holds {n_ctx} "
                           "(including at least one generated token)")
