"""gRPC servicer of a node: validate, convert proto <-> domain, call an engine.

Generation runs on worker threads (llama.cpp blocks); tokens cross back to the event
loop through an asyncio queue. A request the node cannot take gets a clear status at
once (RESOURCE_EXHAUSTED when full, UNAVAILABLE while draining, INVALID_ARGUMENT for bad
input) and never disturbs the requests already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from mesh import PROTOCOL_VERSION, __version__
from mesh.allowed_models import AllowedModels
from mesh.errors import CapacityExhausted, EdgeMeshError, InvalidInput, NotFound, Unavailable
from mesh.metrics import NodeMetrics
from mesh.transport import auth, convert
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.generated import edgemesh_pb2_grpc as pb_grpc
from mesh.types import Embeddings, GenerationRequest, ModelSha, NodeId, NodeInfo, TokenEvent
from node import probe
from node.answering import answering
from node.budget import MemoryBudget
from node.claims import ClaimTable
from node.compute import ComputeThread
from node.engines.llamacpp import LlamaCppEngine
from node.pipeline_head import PipelineHead
from node.replica_host import ReplicaHost
from node.shards import CHUNK_BYTES
from node.speed import SpeedMeter
from node.stage_host import StageHost
from node.stage_steps import StageSteps

log = logging.getLogger(__name__)

_END = object()  # marks the end of a worker's token stream
MAX_SHARD_SOURCES = 16  # peers a LoadStage may name to fetch shards from
# Byte ranges one FetchShard may ask for. A stage's fetch asks for one range per tensor it
# reads (about a dozen per layer: ~1,000 for an 80-layer model); unbounded, a 24 MB request
# of 5 million empty ranges took a node from 85 to 813 MB resident before it was refused,
# and 290,000 one-byte ranges of a 300 KB file kept it streaming for 36 s.
MAX_FETCH_RANGES = 16384
T = TypeVar("T")


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):
        return None
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def _then_trim(work: Callable[..., T], *args: Any) -> T:
    """Run a load or a release, then give what it freed back to the system.

    glibc keeps the blocks a thread frees in that thread's heap, and llama.cpp and ggml free
    buffers of megabytes when a replica or stage is replaced or released. Measured on the
    tiny test model: 400 replica reloads on a worker thread took a process from 59 to 122 MB
    resident, 77 MB flat with malloc_trim after each; 60 reloads grew a node by 21-36 MB
    (1 MB with it), 3,000 gRPC fuzz cases by 57 MB (22 MB). A node's memory budget counts the
    memory free on the device, so what the heap keeps is memory the node believes it lacks."""
    try:
        return work(*args)
    finally:
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)


@dataclass(frozen=True)
class NodeIdentity:
    node_id: NodeId
    name: str
    threads: int
    memory_limit: int
    slots: int
    max_queue: int
    stage_only: bool = False  # --role stage: never a whole-model replica
    allowed: AllowedModels = field(default_factory=AllowedModels)  # --allow-model: all it loads, serves, ships
    # Sessions each pipeline stage it holds is sized for. --slots 0 sizes the replica's slots
    # from memory but keeps stages at one session: a stage allocates every session's KV cache at
    # load and runs its sessions one at a time (issue 16 part 3), so more would only cost memory.
    stage_sessions: int = 1


class NodeState:
    """Mutable runtime facts of a node that Info reports."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.grpc_port = 0
        self.metrics_port = 0
        self.step_port = 0


# A status message travels in a trailer, which gRPC clients refuse past 16 KiB (and may past
# 8 KiB): an error that quotes what it was sent must still reach the caller as that error,
# so it is cut to this many characters (non-ASCII ones are sent as up to 12 bytes each).
MAX_STATUS_DETAIL = 512


def _detail(text: str) -> str:
    return text if len(text) <= MAX_STATUS_DETAIL else text[:MAX_STATUS_DETAIL - 1] + "…"


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: EdgeMeshError) -> None:
    await context.abort(getattr(grpc.StatusCode, error.grpc_code), _detail(str(error)))


@dataclass(frozen=True)
class Holdings:
    """What a node can hold and how it accounts for it: the replica it may serve, the stages
    it loads on request, the memory budget both share, the claims on them and its speed."""

    replica: ReplicaHost
    stages: StageHost
    budget: MemoryBudget
    claims: ClaimTable
    speed: SpeedMeter


class NodeService(pb_grpc.NodeServicer):
    """`holdings.replica` is the whole-model replica (loaded on request, or at start with
    --role replica); `holdings.stages` the pipeline stages loaded on request."""

    def __init__(self, identity: NodeIdentity, holdings: Holdings, metrics: NodeMetrics, state: NodeState,
                 cluster_key: str, compute: ComputeThread, head: PipelineHead) -> None:
        self._id = identity
        self._head = head
        self._cluster_key = cluster_key
        self._replica = holdings.replica
        self._claims = holdings.claims
        self._budget = holdings.budget
        self._speed = holdings.speed
        self._stages = holdings.stages
        self._metrics = metrics
        self._state = state
        self._running = asyncio.Semaphore(identity.slots)
        # Replica tokens and stage steps all run on the node's one compute thread (see
        # node.compute); loads and releases only read files and take locks, so they use a
        # small pool and never make a step wait for a disk read.
        self._compute = compute
        self._stage_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage-io")
        self._steps = StageSteps(holdings.stages, compute, metrics, lambda: state.draining)
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ info

    def info(self) -> NodeInfo:
        mem = probe.memory()
        model = self._replica.model
        activity, progress = self._stages.activity.snapshot()
        return NodeInfo(
            node_id=self._id.node_id, name=self._id.name, version=__version__,
            protocol_version=PROTOCOL_VERSION, pid=os.getpid(), memory_total=mem.total,
            memory_free=mem.free, memory_limit=self._id.memory_limit, threads=self._id.threads,
            models=(model,) if model is not None else (), files=self._stages.files,
            stages=self._stages.held(), slots=self._id.slots, max_queue=self._id.max_queue,
            stage_sessions=self._id.stage_sessions,
            in_flight=self._state.in_flight, draining=self._state.draining,
            grpc_port=self._state.grpc_port, metrics_port=self._state.metrics_port, step_port=self._state.step_port,
            decode_tokens_per_second=self._speed.tokens_per_second, speed_source=self._speed.source,
            step_tokens_per_second=self._speed.step_tokens_per_second, activity=activity,
            activity_progress=progress,
            stage_only=self._id.stage_only, memory_budget=self._budget.total(), claims=self._claims.held(),
            allowed_models=self._id.allowed.shas,
        )

    async def Info(self, request: pb.InfoRequest,
                   context: grpc.aio.ServicerContext[pb.InfoRequest, pb.NodeInfo]) -> pb.NodeInfo:
        async with self._answering("Info", context):
            if len(request.challenge) > 64:
                raise InvalidInput("challenge longer than 64 bytes")
            reply = convert.node_info_to_pb(self.info())
            reply.proof = auth.node_proof(self._cluster_key, bytes(request.challenge), self._id.node_id)
            return reply

    # ------------------------------------------------------------------ generation

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _admit(self) -> EdgeMeshError | None:
        if self._state.draining:
            return Unavailable("node is draining and takes no new requests")
        if self._state.in_flight >= self._id.slots + self._id.max_queue:
            return CapacityExhausted(
                f"node {self._id.name} is full: {self._state.in_flight} requests running or queued "
                f"(limit {self._id.slots + self._id.max_queue})")
        return None

    def _check_replica(self, model_sha256: str, method: str) -> None:
        """The replica serves the model asked for (empty: whichever it holds), an allowed one."""
        model = self._replica.model
        if model is None:
            raise NotFound("this node serves no whole-model replica now (pipeline stages only)")
        if model_sha256:
            self._id.allowed.check(model_sha256, method)
            if model_sha256 != model.sha256:
                raise NotFound(f"this node does not hold model {model_sha256[:12]}")

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateEvent],
                       ) -> AsyncIterator[pb.GenerateEvent]:
        async with self._answering("Generate", context, "generation"):
            started = time.monotonic()
            # The replica stays loaded while this stream holds it: a release waits for the stream.
            with contextlib.ExitStack() as holding:
                try:
                    domain = convert.generate_request_from_pb(request)
                    engine = holding.enter_context(self._replica.serving())
                    self._speed.touch()
                    self._check_replica(domain.model_sha256, "Generate")
                    engine.validate(domain)
                except EdgeMeshError:
                    self._metrics.requests.labels("invalid").inc()
                    raise
                refused = self._admit()
                if refused is not None:
                    self._metrics.requests.labels("rejected").inc()
                    raise refused
                async for reply in self._generate(domain, engine, started):
                    yield reply

    async def _generate(self, domain: GenerationRequest, engine: LlamaCppEngine,
                        started: float) -> AsyncIterator[pb.GenerateEvent]:
        self.enter()
        left = False
        status = "cancelled"
        try:
            # The relay is closed before the slot semaphore is released (contexts exit in
            # reverse): when the caller goes away mid-stream, its cleanup (stop the generator,
            # wait until the engine slot is free) must end first. A bare `async for` would leave
            # that to the GC, and the next request would find the engine slot still taken.
            async with self._running, contextlib.aclosing(self._run_on_worker(domain, engine)) as relay:
                self._metrics.slots_in_use.inc()
                try:
                    produced = 0
                    first_at = 0.0
                    async for event in relay:
                        if produced == 0:
                            first_at = time.monotonic()
                            self._metrics.time_to_first_token.observe(first_at - started)
                        produced += 1
                        self._metrics.tokens.inc()
                        self._speed.touch()  # a long stream is real work: no re-probe meanwhile
                        if event.finish_reason and not left:
                            # The caller is done once it has the last token and frees its own
                            # count then; free ours before sending it so a request sent right
                            # after is not refused by a node that is only tidying up.
                            self.leave()
                            left = True
                        yield convert.token_event_to_pb(event)
                    status = "ok"
                    if produced > 1:
                        decode_s = max(time.monotonic() - first_at, 1e-9)
                        self._metrics.tokens_per_second.set((produced - 1) / decode_s)
                        self._speed.record_tokens(produced - 1, decode_s)
                finally:
                    self._metrics.slots_in_use.dec()
        except Exception:  # answered by Generate's _answering; an engine failure must not take the node down
            status = "error"
            raise
        finally:
            self._metrics.prompt_tokens.inc(len(domain.prompt_tokens))
            self._metrics.requests.labels(status).inc()
            if not left:
                self.leave()

    def enter(self) -> None:
        """A stream or step connection starts; a draining node waits for it (event loop only)."""
        self._state.in_flight += 1
        self._metrics.in_flight.set(self._state.in_flight)
        self._idle.clear()

    def leave(self) -> None:
        self._state.in_flight -= 1
        self._metrics.in_flight.set(self._state.in_flight)
        if self._state.in_flight == 0:
            self._idle.set()

    async def _run_on_worker(self, request: GenerationRequest,
                             engine: LlamaCppEngine) -> AsyncGenerator[TokenEvent, None]:
        """Run the engine's stream (its session thread; its llama.cpp steps on the compute
        thread) and relay its events. When the consumer stops (client cancelled), the stream is
        told to stop and awaited, so the slot is free again before the next request takes it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def relay_end(done: Future[None]) -> None:
            error = done.exception()
            if error is not None:
                put(error)  # relayed to the event loop and raised there
            put(_END)

        future = engine.stream(request, stop.is_set, put)
        future.add_done_callback(relay_end)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TokenEvent)
                yield item
        finally:
            stop.set()
            # Wait for the slot to be free again; an error of the stream was relayed above.
            # The wait is shielded: a second cancel of the handler must not release the slot
            # semaphore while the engine still holds its slot.
            done = asyncio.wrap_future(future)
            cancelled = False
            while not done.done():
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    cancelled = True
                except Exception:  # noqa: BLE001, S110 - the stream's own error was relayed above
                    pass
            if cancelled:
                raise asyncio.CancelledError

    # ------------------------------------------------------------------ pipeline stages

    @contextlib.asynccontextmanager
    async def _answering(self, method: str, context: grpc.aio.ServicerContext[Any, Any],
                         what: str = "") -> AsyncIterator[None]:
        """The one error and metrics path of every RPC (node.answering): time the call, turn our
        errors into their status, and any other failure (disk, memory, a bug) into INTERNAL,
        logged, while the node keeps serving."""
        with answering(self._metrics, method, what) as answer:
            yield
        if answer.error is not None:
            failed = getattr(answer.error, "node_id", None)
            if failed and failed != self._id.node_id:
                # A pipeline stage failed: the gateway must replace that node, not this head.
                context.set_trailing_metadata(((convert.FAILED_NODE_METADATA, failed),))
            await _abort(context, answer.error)

    async def LoadStage(self, request: pb.LoadStageRequest,
                        context: grpc.aio.ServicerContext[pb.LoadStageRequest, pb.LoadStageReply]) -> pb.LoadStageReply:
        async with self._answering("LoadStage", context):
            if self._state.draining:
                raise Unavailable("node is draining and loads no new stages")
            try:
                layers = convert.layer_range_from_pb(request.layers)
            except ValueError as exc:  # an impossible layer range
                raise InvalidInput(str(exc)) from None
            model_sha = ModelSha(request.model_sha256)
            if not model_sha:
                raise InvalidInput("LoadStage must name its model's sha256")
            self._id.allowed.check(model_sha, "LoadStage")  # before any claim, fetch or load
            self._claims.check(model_sha, request.controller_id, "LoadStage")
            sources = list(request.shard_sources)
            if len(sources) > MAX_SHARD_SOURCES or any(not 0 < len(a) <= 255 or not a.isascii() for a in sources):
                raise InvalidInput(f"shard_sources: at most {MAX_SHARD_SOURCES} HOST:PORT addresses")
            await self._stages.ensure_present(model_sha, layers, sources)
            held = await asyncio.get_running_loop().run_in_executor(
                self._stage_pool, _then_trim, self._stages.load, model_sha, layers, request.n_ctx, request.slots,
                request.prefill_chunk)
            return convert.load_stage_reply_to_pb(held)

    async def LoadModel(self, request: pb.LoadModelRequest,
                        context: grpc.aio.ServicerContext[pb.LoadModelRequest, pb.LoadModelReply]) -> pb.LoadModelReply:
        """Serve the whole model as a replica (idempotent), within the node's memory budget."""
        async with self._answering("LoadModel", context):
            if self._state.draining:
                raise Unavailable("node is draining and loads nothing new")
            model_sha = ModelSha(request.model_sha256)
            if not model_sha:
                raise InvalidInput("LoadModel must name its model's sha256")
            self._id.allowed.check(model_sha, "LoadModel")
            self._claims.check(model_sha, request.controller_id, "LoadModel")
            model = await asyncio.get_running_loop().run_in_executor(
                self._stage_pool, _then_trim, self._replica.load, model_sha, request.n_ctx)
            return convert.load_model_reply_to_pb(model)

    async def ReleaseHolding(self, request: pb.ReleaseHoldingRequest,
                             context: grpc.aio.ServicerContext[pb.ReleaseHoldingRequest, pb.ReleaseHoldingReply],
                             ) -> pb.ReleaseHoldingReply:
        """Stop serving a stage or the replica; what has open sessions is freed when they end."""
        async with self._answering("ReleaseHolding", context):
            model_sha, layers, controller_id = convert.release_holding_from_pb(request)
            self._claims.check(model_sha, controller_id, "ReleaseHolding")
            if layers is None:
                replica = self._replica.model
                # On a worker: freeing llama.cpp's context takes a moment the event loop must not wait.
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._stage_pool, _then_trim, self._replica.release) \
                    if replica is not None and replica.sha256 == model_sha else "absent"
            else:
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._stage_pool, _then_trim, self._stages.release_stage, model_sha, layers)
            return convert.release_holding_reply_to_pb(outcome == "released", outcome == "pending")

    async def Claim(self, request: pb.ClaimRequest,
                    context: grpc.aio.ServicerContext[pb.ClaimRequest, pb.ClaimReply]) -> pb.ClaimReply:
        async with self._answering("Claim", context):
            answer = self._claims.claim(ModelSha(request.model_sha256), request.controller_id, request.ttl_s,
                                        request.give_up)
            return convert.claim_reply_to_pb(answer.granted, answer.holder, answer.expires_in_s)

    async def Forward(self, request_iterator: AsyncIterator[pb.ForwardRequest],
                      context: grpc.aio.ServicerContext[pb.ForwardRequest, pb.ForwardReply],
                      ) -> AsyncIterator[pb.ForwardReply]:
        """One long-lived stream per (session driver, stage). Sessions opened on a stream are
        freed when the stream ends however it ends: done, cancelled, timed out or broken."""
        opened: set[str] = set()
        self.enter()
        try:
            async for msg in request_iterator:
                async with self._answering("Forward", context, "the step"):  # an error ends the stream
                    self._metrics.bytes_in.inc(msg.ByteSize())
                    step, running = self._steps.start(msg, opened)
                    reply = self._steps.reply(step, await asyncio.wrap_future(running))
                    self._metrics.bytes_out.inc(reply.ByteSize())
                yield reply
        except DecodeError as exc:
            # gRPC parses each message of the stream as the loop reads it: bytes that are not a
            # ForwardRequest surface here (left alone, the call ended UNKNOWN with a traceback).
            async with self._answering("Forward", context):
                raise InvalidInput(f"a Forward step is not a ForwardRequest: {exc}") from None
        finally:
            self._steps.release(opened)
            self.leave()

    async def RunPipeline(self, request: pb.RunPipelineRequest,
                          context: grpc.aio.ServicerContext[pb.RunPipelineRequest, pb.GenerateEvent],
                          ) -> AsyncIterator[pb.GenerateEvent]:
        """A whole pipeline request, this node being stage 0 (see node.pipeline_head)."""
        async with self._answering("RunPipeline", context, "the pipeline"):
            job = convert.pipeline_job_from_pb(request)
            if self._state.draining:
                raise Unavailable("node is draining and takes no new pipeline requests")
            self.enter()
            left = False
            try:
                async with contextlib.aclosing(self._head.run(job)) as events:
                    async for event in events:
                        if event.finish_reason and not left:
                            self.leave()  # as in Generate: the caller stops counting at the last token
                            left = True
                        yield convert.token_event_to_pb(event)
            finally:
                if not left:
                    self.leave()

    async def FetchShard(self, request: pb.FetchShardRequest,
                         context: grpc.aio.ServicerContext[pb.FetchShardRequest, pb.ShardChunk],
                         ) -> AsyncIterator[pb.ShardChunk]:
        """Stream byte ranges of a file this node holds whole, each range closed by its sha256."""
        async with self._answering("FetchShard", context):
            async for chunk in self._fetch_shard(request):
                yield chunk

    async def _fetch_shard(self, request: pb.FetchShardRequest) -> AsyncIterator[pb.ShardChunk]:
        try:
            self._id.allowed.check(request.model_sha256, "FetchShard")  # never ship a model not approved
            path = self._stages.whole_file(ModelSha(request.model_sha256))
            size = path.stat().st_size
            if request.header:
                from node.gguf_header import read_gguf_header

                ranges = [(0, read_gguf_header(path)[2])]
            elif len(request.ranges) > MAX_FETCH_RANGES:
                raise InvalidInput(f"a FetchShard asks for at most {MAX_FETCH_RANGES} byte ranges, "
                                   f"not {len(request.ranges)}")
            else:
                ranges = [(r.offset, r.length) for r in request.ranges]
            if any(n == 0 or o + n > size for o, n in ranges) or sum(n for _, n in ranges) > size:
                raise InvalidInput(f"byte ranges must lie inside the file's {size} bytes")
        except OSError as exc:
            raise NotFound(f"cannot read the model file: {exc}") from None
        first = True
        with open(path, "rb") as f:
            for offset, length in ranges:
                digest = hashlib.sha256()
                done = 0
                while done < length:
                    data = await asyncio.to_thread(os.pread, f.fileno(), min(CHUNK_BYTES, length - done), offset + done)
                    digest.update(data)
                    done += len(data)
                    last = done >= length
                    self._metrics.bytes_out.inc(len(data))
                    yield convert.shard_chunk_to_pb(
                        offset + done - len(data), data, range_sha256=digest.hexdigest() if last else "",
                        range_offset=offset if last else 0, range_length=length if last else 0,
                        file_bytes=size if first else 0)
                    first = False

    # ------------------------------------------------------------------ embeddings

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext[pb.EmbedRequest, pb.EmbedReply]) -> pb.EmbedReply:
        """Pooled vectors of a few inputs on the whole-model replica (see node.engines.embedder)."""
        async with self._answering("Embed", context):
            batch = convert.embed_request_from_pb(request)
            refused = self._admit()
            if refused is not None:
                raise refused
            with self._replica.serving() as engine:  # a release waits for this call, as for a stream
                self._check_replica(batch.model_sha256, "Embed")
                loop = asyncio.get_running_loop()
                # Opening the context (first use) reads the file: off the compute thread, so the
                # token steps of streams in flight do not wait for it.
                embedder = await loop.run_in_executor(self._stage_pool, self._replica.embedder, engine)
                embedder.validate(batch)
                self.enter()
                try:
                    self._speed.touch()
                    # One compute turn per input: the steps of streams in flight go between them.
                    rows = [await asyncio.wrap_future(self._compute.call(partial(embedder.embed_one, tokens)))
                            for tokens in batch.inputs]
                finally:
                    self.leave()
            self._metrics.prompt_tokens.inc(sum(len(tokens) for tokens in batch.inputs))
            return convert.embed_reply_to_pb(Embeddings(vectors=np.stack(rows), pooling=embedder.pooling_name))

    def shutdown(self) -> None:
        self._stage_pool.shutdown(wait=True, cancel_futures=True)
        self._stages.close()
