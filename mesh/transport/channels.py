"""Client side of the wire: channels with keepalive and size limits, and NodeClient, the
only way the mesh calls a node. Every call it makes is signed and has a deadline."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar, Union, cast

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.config import Limits, Timeouts
from mesh.errors import (
    CapacityExhausted,
    EdgeMeshError,
    InvalidInput,
    NotClaimHolder,
    NotFound,
    PeerError,
    Unauthenticated,
)
from mesh.transport import auth, convert, tls
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.generated import edgemesh_pb2_grpc as pb_grpc
from mesh.types import (
    EmbedBatch,
    Embeddings,
    GenerationRequest,
    HiddenDType,
    LayerRange,
    ModelHeld,
    NodeInfo,
    PipelineJob,
    ShardChunk,
    StageHeld,
    StageOutput,
    StageStep,
    TokenEvent,
)

log = logging.getLogger(__name__)

SERVICE = "/edgemesh.v1.Node/"

_Reply = TypeVar("_Reply", bound=Message)
# A call this client reads replies from, and may end early (abandon(), a deadline, close()).
_Stream = Union["grpc.aio.UnaryStreamCall[Any, Any]", "grpc.aio.StreamStreamCall[Any, Any]"]


async def _next_reply(call: grpc.aio.UnaryStreamCall[Any, _Reply] | grpc.aio.StreamStreamCall[Any, _Reply],
                      ) -> _Reply | None:
    """The stream's next reply, None at its end. (grpc types read() as `object | reply`, its
    end-of-stream marker being a plain object, so the narrowing is done here once.)"""
    msg = await call.read()
    return None if msg is grpc.aio.EOF else cast(_Reply, msg)


def shared_options(timeouts: Timeouts, limits: Limits) -> list[tuple[str, int]]:
    """Size limits and keepalive, the same on both ends of every connection."""
    return [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.keepalive_time_ms", int(timeouts.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeouts.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options(timeouts: Timeouts, limits: Limits) -> list[tuple[str, int]]:
    """Client keepalive is off in gRPC by default; we turn it on so a dead peer is noticed
    even while a stream is silent."""
    return [
        *shared_options(timeouts, limits),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # retries are the scheduler's decision, per call
    ]


def open_channel(address: str, cluster_key: str, options: Sequence[tuple[str, int | str]],
                 node_id: str | None = None) -> grpc.aio.Channel:
    """A channel to a node: mutual TLS under the cluster CA (see mesh.transport.tls), checking
    that the certificate names `node_id` (any node of the cluster when it is not known yet)."""
    credentials = tls.credentials_for(cluster_key)
    if credentials is None:  # --insecure-plaintext, loopback only
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials.grpc_channel,
                                   options=[*options, ("grpc.ssl_target_name_override", tls.expected_name(node_id))])


# What gRPC's details say when a TLS handshake fails on a certificate or a protocol mismatch,
# as opposed to a connection that broke (those stay retryable). Only gRPC's own connection
# failure counts: a node's status text may quote another hop's failure, which is that hop's.
_CONNECT_FAILED = "failed to connect to all addresses"
_TLS_REFUSALS = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER", "Hostname Verification Check failed",
                 "TLSV1_ALERT", "SSLV3_ALERT", "CERTIFICATE_REQUIRED")


def error_from_rpc(exc: grpc.aio.AioRpcError, what: str) -> EdgeMeshError:
    """Map a failed call to our error hierarchy; only transport-level failures are retryable."""
    code = exc.code()
    detail = exc.details() or code.name
    message = f"{what}: {detail}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(message)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(message)
    if code == grpc.StatusCode.UNAUTHENTICATED or (
            code == grpc.StatusCode.UNAVAILABLE and detail.startswith(_CONNECT_FAILED)
            and any(sign in detail for sign in _TLS_REFUSALS)):
        # A TLS refusal comes back as UNAVAILABLE, but it is no outage: the peer has no
        # certificate of this cluster (another mesh, an impostor, a plain-text process).
        return Unauthenticated(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CapacityExhausted(message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return NotClaimHolder(message)
    retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN,
                         grpc.StatusCode.INTERNAL)
    return PeerError(message, retryable=retryable, code=code.name)


class _OpenStream:
    """A token stream of a NodeClient, for abandon(): when it last heard a token, and how to end it."""

    def __init__(self, call: _Stream) -> None:
        self.call = call
        self.last_event = time.monotonic()  # the call's start counts: a first token may take long
        self.reasons: list[str] = []

    def end(self, reason: str) -> None:
        self.reasons.append(reason)
        self.call.cancel()


class NodeClient:
    """A connection to one node."""

    def __init__(self, address: str, cluster_key: str, timeouts: Timeouts, limits: Limits,
                 node_id: str | None = None) -> None:
        self.address = address
        self._key = cluster_key
        self._timeouts = timeouts
        self._channel = open_channel(address, cluster_key, channel_options(timeouts, limits), node_id)
        self._stub = pb_grpc.NodeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # The token streams open on this node. When membership decides the node is gone (its
        # Info or health watch failed), a stream that has gone quiet too would otherwise wait
        # out its token-idle deadline before it fails over.
        self._open_streams: dict[object, _OpenStream] = {}

    def abandon(self, reason: str, quiet_s: float) -> None:
        """End, with a PeerError that says `reason` (membership's verdict), every Generate/
        RunPipeline stream on this node that has had no token for `quiet_s`; the scheduler then
        fails them over. A stream still receiving tokens is left alone: a node whose Info was
        merely slow is serving it."""
        now = time.monotonic()
        for stream in list(self._open_streams.values()):
            if now - stream.last_event >= quiet_s:
                stream.end(reason)

    def _track(self, call: _Stream) -> tuple[object, _OpenStream]:
        key, stream = object(), _OpenStream(call)
        self._open_streams[key] = stream
        return key, stream

    def _meta(self, method: str, request: Message | None = None) -> tuple[tuple[str, str], ...]:
        """Fresh signed metadata for one call; `request` binds a single-request call's body to
        the signature (leave it out only for request-streaming calls)."""
        return auth.sign(self._key, SERVICE + method, request)

    async def info(self) -> NodeInfo:
        """The node's Info, once it has proved it knows the cluster key (a node only ever gets
        work, prompts or signed calls after this check)."""
        challenge = os.urandom(16)
        request = convert.info_request(challenge)
        try:
            msg = await self._stub.Info(request, timeout=self._timeouts.info_rpc_s,
                                        metadata=self._meta("Info", request))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"Info on {self.address}") from exc
        if not hmac.compare_digest(msg.proof, auth.node_proof(self._key, challenge, msg.node_id)):
            raise Unauthenticated(f"{self.address} cannot prove it knows the cluster key")
        return convert.node_info_from_pb(msg)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream tokens. The whole call has the request deadline, the first token its own
        deadline and every later token the idle deadline, so a stalled node is noticed."""
        pb_request = convert.generate_request_to_pb(request)
        call = self._stub.Generate(pb_request, timeout=self._timeouts.request_s,
                                   metadata=self._meta("Generate", pb_request))
        first = True
        key, tracked = self._track(call)
        try:
            while True:
                wait = self._timeouts.first_token_s if first else self._timeouts.token_idle_s
                try:
                    msg = await asyncio.wait_for(_next_reply(call), timeout=wait)
                except asyncio.TimeoutError:
                    call.cancel()
                    raise PeerError(f"Generate on {self.address}: no token for {wait:.0f}s") from None
                if msg is None:
                    return
                first = False
                tracked.last_event = time.monotonic()
                yield convert.token_event_from_pb(msg)
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as exc:
            if tracked.reasons:
                raise PeerError(f"Generate on {self.address}: {tracked.reasons[0]}") from None
            if isinstance(exc, asyncio.CancelledError):
                raise  # our own task was cancelled (the client went away)
            raise error_from_rpc(exc, f"Generate on {self.address}") from exc
        finally:
            self._open_streams.pop(key, None)
            call.cancel()  # no-op after a clean end; frees the node's slot when the consumer stops early

    async def health_watch(self) -> AsyncIterator[bool]:
        """Yields True/False as the node's health status changes. Ends quietly when the
        watch's own deadline passes (the caller watches again); raises when the stream breaks."""
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=""),
                                  timeout=self._timeouts.request_s)
        try:
            async for msg in call:
                yield msg.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return  # a long watch simply ran its course; keepalive guards the link meanwhile
            raise error_from_rpc(exc, f"health watch on {self.address}") from exc
        finally:
            call.cancel()

    async def load_stage(self, model_sha256: str, layers: LayerRange, n_ctx: int, slots: int,
                         timeout_s: float, prefill_chunk: int = 0, controller_id: str = "",
                         shard_sources: tuple[str, ...] = ()) -> StageHeld:
        """Ask the node to load a layer range (reads its bytes from disk, or fetches them from a
        peer: may take a while)."""
        request = convert.load_stage_request_to_pb(model_sha256, layers, n_ctx, slots, prefill_chunk, controller_id,
                                                   shard_sources)
        try:
            reply = await self._stub.LoadStage(request,
                                               timeout=timeout_s, metadata=self._meta("LoadStage", request))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"LoadStage on {self.address}") from exc
        return convert.stage_from_pb(reply.stage)

    async def load_model(self, model_sha256: str, n_ctx: int, timeout_s: float, controller_id: str) -> ModelHeld:
        """Ask the node to serve the whole model as a replica (llama.cpp reads the file: may take a while)."""
        request = convert.load_model_request_to_pb(model_sha256, n_ctx, controller_id)
        try:
            reply = await self._stub.LoadModel(request, timeout=timeout_s, metadata=self._meta("LoadModel", request))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"LoadModel on {self.address}") from exc
        return convert.model_from_pb(reply.model)

    async def release_holding(self, model_sha256: str, layers: LayerRange | None, controller_id: str) -> str:
        """Release a stage (or, `layers` None, the replica): 'released' (freed now), 'pending'
        (freed once its open sessions end) or 'absent' (not held)."""
        request = convert.release_holding_request_to_pb(model_sha256, layers, controller_id)
        try:
            reply = await self._stub.ReleaseHolding(request, timeout=self._timeouts.info_rpc_s,
                                                    metadata=self._meta("ReleaseHolding", request))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"ReleaseHolding on {self.address}") from exc
        return "released" if reply.released else "pending" if reply.pending else "absent"

    async def claim(self, model_sha256: str, controller_id: str, ttl_s: float,
                    give_up: bool = False) -> tuple[bool, str, float]:
        """(granted, holder, seconds left) of this node's placement claim for the model."""
        request = convert.claim_request_to_pb(model_sha256, controller_id, ttl_s, give_up)
        try:
            reply = await self._stub.Claim(request, timeout=self._timeouts.info_rpc_s,
                                           metadata=self._meta("Claim", request))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"Claim on {self.address}") from exc
        return bool(reply.granted), str(reply.holder), float(reply.expires_in_s)

    async def run_pipeline(self, job: PipelineJob) -> AsyncIterator[TokenEvent]:
        """Stream a pipeline request's tokens from its head, the node of stage 0. The head
        blames a later stage that stalls (after job.step_timeout_s) and names it in the status;
        this side waits head_margin_s longer, so it counts the head as failed only when the
        head itself goes silent."""
        request = convert.pipeline_job_to_pb(job)
        call = self._stub.RunPipeline(request, timeout=self._timeouts.request_s,
                                      metadata=self._meta("RunPipeline", request))
        head = job.stages[0].node_id
        loop = asyncio.get_running_loop()
        wait = self._timeouts.first_token_s + self._timeouts.head_margin_s
        expired = False
        key, tracked = self._track(call)

        def expire() -> None:
            nonlocal expired
            expired = True
            call.cancel()

        try:
            while True:
                # A timer that cancels the call, not asyncio.wait_for (a task per token).
                timer = loop.call_later(wait, expire)
                try:
                    msg = await _next_reply(call)
                finally:
                    timer.cancel()
                if msg is None:
                    return
                wait = job.step_timeout_s + self._timeouts.head_margin_s
                tracked.last_event = time.monotonic()
                yield convert.token_event_from_pb(msg)
        except asyncio.CancelledError:
            if tracked.reasons:
                raise PeerError(f"RunPipeline on {self.address}: {tracked.reasons[0]}", node_id=head) from None
            if not expired:
                raise  # our own task was cancelled (the client went away)
            raise PeerError(f"RunPipeline on {self.address}: no token for {wait:.0f}s", node_id=head) from None
        except grpc.aio.AioRpcError as exc:
            if tracked.reasons:
                raise PeerError(f"RunPipeline on {self.address}: {tracked.reasons[0]}", node_id=head) from None
            if expired:
                raise PeerError(f"RunPipeline on {self.address}: no token for {wait:.0f}s", node_id=head) from None
            error = error_from_rpc(exc, f"RunPipeline on {self.address}")
            if isinstance(error, PeerError):
                failed = dict(exc.trailing_metadata() or ()).get(convert.FAILED_NODE_METADATA)
                error.node_id = failed or head
            raise error from exc
        finally:
            self._open_streams.pop(key, None)
            call.cancel()  # no-op after a clean end; frees every stage when the consumer stops early

    def open_forward(self, step_timeout_s: float) -> StageStream:
        """A long-lived Forward stream for one session's steps through one stage."""
        call = self._stub.Forward(timeout=self._timeouts.request_s, metadata=self._meta("Forward"))
        return StageStream(self.address, call, self._timeouts, step_timeout_s)

    async def fetch_shard(self, model_sha256: str, ranges: list[tuple[int, int]],
                          header: bool) -> AsyncIterator[ShardChunk]:
        """Bytes of a model file from a node that holds it whole (see node.shards)."""
        request = convert.fetch_shard_request_to_pb(model_sha256, ranges, header)
        call = self._stub.FetchShard(request, timeout=self._timeouts.request_s,
                                     metadata=self._meta("FetchShard", request))
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(_next_reply(call), timeout=self._timeouts.token_idle_s)
                except asyncio.TimeoutError:
                    raise PeerError(f"FetchShard on {self.address}: stalled") from None
                if msg is None:
                    return
                yield convert.shard_chunk_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"FetchShard on {self.address}") from exc
        finally:
            call.cancel()

    async def embed(self, batch: EmbedBatch) -> Embeddings:
        """Pooled, normalized vectors of a few inputs, computed by the node's replica."""
        request = convert.embed_request_to_pb(batch)
        try:
            reply = await self._stub.Embed(request, timeout=self._timeouts.embed_rpc_s,
                                           metadata=self._meta("Embed", request))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"Embed on {self.address}") from exc
        try:
            return convert.embed_reply_from_pb(reply, len(batch.inputs))
        except InvalidInput as exc:  # a node that answers nonsense is a failed node, not a bad request
            raise PeerError(f"Embed on {self.address}: {exc}", retryable=False) from None

    async def close(self) -> None:
        await self._channel.close(grace=None)


class StageStream:
    """One Forward stream: send a step, read its reply. A reply slower than the step
    deadline (first_token_s for a prefill chunk, step_timeout_s for one token) counts as a
    failed stage, so a stage behind a cut link is replaced within seconds."""

    def __init__(self, address: str, call: grpc.aio.StreamStreamCall[pb.ForwardRequest, pb.ForwardReply],
                 timeouts: Timeouts, step_timeout_s: float) -> None:
        self.address = address
        self._call = call
        self._timeouts = timeouts
        self._step_timeout_s = step_timeout_s

    async def step(self, step: StageStep, hidden_dtype: HiddenDType = "f32") -> StageOutput:
        wait = self._timeouts.first_token_s if step.n_tokens > 1 else self._step_timeout_s
        # The deadline is a timer that cancels the call, not asyncio.wait_for: wait_for wraps
        # each await in a task, and at two awaits per stage per token that was a tenth of the
        # gateway's cost of a decode step.
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._call.cancel()

        timer = asyncio.get_running_loop().call_later(wait, expire)
        try:
            await self._call.write(convert.stage_step_to_pb(step, hidden_dtype))
            msg = await _next_reply(self._call)
        except asyncio.CancelledError:
            if not expired:
                raise  # our own task was cancelled (the client went away)
            raise self._timed_out(wait) from None
        except grpc.aio.AioRpcError as exc:
            if expired:
                raise self._timed_out(wait) from None
            raise error_from_rpc(exc, f"Forward on {self.address}") from exc
        except (grpc.aio.UsageError, asyncio.InvalidStateError, RuntimeError) as exc:  # the call already ended
            raise await self._ended(exc) from exc
        finally:
            timer.cancel()
        if expired:  # the timer fired as the reply came in
            raise self._timed_out(wait)
        if msg is None:
            raise await self._ended(None)
        output = convert.stage_output_from_pb(msg)
        if output.step != step.step:
            raise PeerError(f"Forward on {self.address}: reply to step {output.step}, expected {step.step}",
                            retryable=False)
        return output

    def _timed_out(self, wait: float) -> PeerError:
        return PeerError(f"Forward on {self.address}: no reply within {wait:.0f}s")

    async def _ended(self, cause: Exception | None) -> EdgeMeshError:
        """Why the stream is over: the node's status when it sent one, else a broken peer."""
        if self._call.done():
            code, detail = await self._call.code(), await self._call.details()
            if code != grpc.StatusCode.OK:
                status = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=detail)
                return error_from_rpc(status, f"Forward on {self.address}")
        return PeerError(f"Forward on {self.address}: stream ended ({cause or 'no reply'})")

    def close(self) -> None:
        """End the stream; the node frees every session it opened on it."""
        self._call.cancel()
