"""Protobuf <-> domain conversion, in one place, so protobuf never leaks past the edges."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidInput
from mesh.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from mesh.transport import hidden_wire
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.types import (
    CONSTRAINT_KINDS,
    STARTUP_PROBE,
    ActivationDType,
    Claimed,
    Constraint,
    EmbedBatch,
    Embeddings,
    FinishReason,
    GenerationRequest,
    HiddenDType,
    LayerRange,
    ModelHeld,
    ModelSha,
    NodeId,
    NodeInfo,
    PipelineHop,
    PipelineJob,
    RequestId,
    SamplingParams,
    ShardChunk,
    StageHeld,
    StageOutput,
    StageStep,
    TokenEvent,
    TopLogprob,
)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        repeat_penalty=params.repeat_penalty, seed=params.seed, repeat_last_n=params.repeat_last_n,
        frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
        logit_bias=[pb.LogitBias(token_id=token, bias=bias) for token, bias in params.logit_bias],
    )


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Sampling parameters from a peer, refused unless they make sense. Proto3 sends an unset
    field as 0, so a 0 top_p or repeat_penalty means "off" (1.0), as an absent message does."""
    top_p = msg.top_p or 1.0
    repeat_penalty = msg.repeat_penalty or 1.0
    values = (msg.temperature, top_p, msg.min_p, repeat_penalty, msg.frequency_penalty, msg.presence_penalty)
    if not all(math.isfinite(v) for v in values):
        raise InvalidInput("sampling parameters must be finite numbers")
    if msg.temperature < 0 or not 0 < top_p <= 1 or not 0 <= msg.min_p <= 1 or repeat_penalty < 0:
        raise InvalidInput("sampling parameters out of range (temperature >= 0, 0 < top_p <= 1, "
                           "0 <= min_p <= 1, repeat_penalty > 0)")
    if len(msg.logit_bias) > MAX_LOGIT_BIAS:  # before building a tuple of a peer's unbounded list
        raise InvalidInput(f"logit_bias has {len(msg.logit_bias)} entries, more than {MAX_LOGIT_BIAS}")
    bias: dict[int, float] = {}
    for entry in msg.logit_bias:
        if not math.isfinite(entry.bias):
            raise InvalidInput(f"logit_bias: the bias of token {entry.token_id} is not a finite number")
        bias[entry.token_id] = entry.bias  # a repeated id: the last one counts, as in a JSON object
    return SamplingParams(
        temperature=msg.temperature, top_p=top_p, top_k=msg.top_k, min_p=msg.min_p,
        repeat_penalty=repeat_penalty, seed=msg.seed, repeat_last_n=msg.repeat_last_n,
        frequency_penalty=msg.frequency_penalty, presence_penalty=msg.presence_penalty,
        logit_bias=tuple(sorted(bias.items())),
    )


def _top_to_pb(top: Sequence[TopLogprob]) -> list[pb.TopLogprob]:
    return [pb.TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in top]


def _top_from_pb(items: Sequence[pb.TopLogprob]) -> tuple[TopLogprob, ...]:
    if len(items) > MAX_TOP_LOGPROBS:
        raise InvalidInput(f"{len(items)} top log-probabilities, more than {MAX_TOP_LOGPROBS}")
    return tuple(TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in items)


MAX_CONSTRAINT_CHARS = 1 * 2**20  # mesh.constraints.MAX_GRAMMAR_CHARS; kept here without its import


def constraint_to_pb(constraint: Constraint | None) -> pb.Constraint | None:
    return None if constraint is None else pb.Constraint(kind=constraint.kind, grammar=constraint.grammar)


def constraint_from_pb(msg: pb.Constraint, present: bool) -> Constraint | None:
    """The shape only; whether the grammar compiles is the sampling node's to find out."""
    if not present:
        return None
    kind = next((k for k in CONSTRAINT_KINDS if k == msg.kind), None)
    if kind is None:
        raise InvalidInput(f"constraint.kind must be one of {', '.join(CONSTRAINT_KINDS)}, got {msg.kind[:40]!r}")
    if len(msg.grammar) > MAX_CONSTRAINT_CHARS:
        raise InvalidInput(f"constraint.grammar is longer than {MAX_CONSTRAINT_CHARS} characters")
    return Constraint(kind=kind, grammar=msg.grammar)


def generate_request_to_pb(req: GenerationRequest) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=req.request_id, model_sha256=req.model_sha256, prompt_tokens=list(req.prompt_tokens),
        sampling=sampling_to_pb(req.sampling), max_tokens=req.max_tokens,
        stop_token_ids=sorted(req.stop_token_ids), logprobs=req.logprobs,
        replay_tokens=list(req.replay_tokens), top_logprobs=req.top_logprobs,
        constraint=constraint_to_pb(req.constraint),
    )


def generate_request_from_pb(msg: pb.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        request_id=RequestId(msg.request_id), prompt_tokens=tuple(msg.prompt_tokens),
        sampling=sampling_from_pb(msg.sampling), max_tokens=msg.max_tokens,
        stop_token_ids=frozenset(msg.stop_token_ids), logprobs=msg.logprobs,
        replay_tokens=tuple(msg.replay_tokens), top_logprobs=msg.top_logprobs,
        model_sha256=ModelSha(msg.model_sha256),
        constraint=constraint_from_pb(msg.constraint, msg.HasField("constraint")),
    )


def token_event_to_pb(event: TokenEvent) -> pb.GenerateEvent:
    return pb.GenerateEvent(token_id=event.token_id, logprob=event.logprob, position=event.position,
                            finish_reason=event.finish_reason or "", top_logprobs=_top_to_pb(event.top_logprobs))


def token_event_from_pb(msg: pb.GenerateEvent) -> TokenEvent:
    return TokenEvent(token_id=msg.token_id, position=msg.position, logprob=msg.logprob,
                      finish_reason=_FINISH.get(msg.finish_reason), top_logprobs=_top_from_pb(msg.top_logprobs))


def layer_range_to_pb(layers: LayerRange) -> pb.LayerRange:
    return pb.LayerRange(first=layers.first, last_exclusive=layers.last_exclusive)


def layer_range_from_pb(msg: pb.LayerRange) -> LayerRange:
    return LayerRange(msg.first, msg.last_exclusive)


def stage_to_pb(stage: StageHeld) -> pb.StageHeld:
    return pb.StageHeld(model_sha256=stage.model_sha256, layers=layer_range_to_pb(stage.layers),
                        slots=stage.slots, weight_bytes=stage.weight_bytes,
                        kv_cache_bytes=stage.kv_cache_bytes, compute_bytes=stage.compute_bytes,
                        prefill_chunk=stage.prefill_chunk, n_ctx=stage.n_ctx)


def stage_from_pb(msg: pb.StageHeld) -> StageHeld:
    return StageHeld(model_sha256=ModelSha(msg.model_sha256), layers=layer_range_from_pb(msg.layers),
                     slots=msg.slots, weight_bytes=msg.weight_bytes, kv_cache_bytes=msg.kv_cache_bytes,
                     compute_bytes=msg.compute_bytes, prefill_chunk=msg.prefill_chunk or 512, n_ctx=msg.n_ctx)


def model_to_pb(m: ModelHeld) -> pb.ModelHeld:
    return pb.ModelHeld(name=m.name, sha256=m.sha256, n_layers=m.n_layers, file_bytes=m.file_bytes,
                        n_ctx=m.n_ctx, architecture=m.architecture, n_vocab=m.n_vocab, shard_copy=m.shard_copy)


def model_from_pb(m: pb.ModelHeld) -> ModelHeld:
    return ModelHeld(name=m.name, sha256=ModelSha(m.sha256), n_layers=m.n_layers, file_bytes=m.file_bytes,
                     n_ctx=m.n_ctx, architecture=m.architecture, n_vocab=m.n_vocab, shard_copy=m.shard_copy)


def claimed_to_pb(c: Claimed) -> pb.Claimed:
    return pb.Claimed(model_sha256=c.model_sha256, controller_id=c.controller_id, expires_in_s=c.expires_in_s)


def claimed_from_pb(c: pb.Claimed) -> Claimed:
    return Claimed(model_sha256=ModelSha(c.model_sha256), controller_id=c.controller_id,
                   expires_in_s=c.expires_in_s)


MAX_ALLOWED_MODELS = 256  # --allow-model entries of a peer's Info the gateway keeps


def node_info_to_pb(info: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=info.node_id, name=info.name, version=info.version, protocol_version=info.protocol_version,
        pid=info.pid, memory_total=info.memory_total, memory_free=info.memory_free,
        memory_limit=info.memory_limit, threads=info.threads,
        models=[model_to_pb(m) for m in info.models], files=[model_to_pb(m) for m in info.files],
        slots=info.slots, max_queue=info.max_queue, in_flight=info.in_flight, draining=info.draining,
        grpc_port=info.grpc_port, metrics_port=info.metrics_port, step_port=info.step_port,
        stages=[stage_to_pb(s) for s in info.stages],
        decode_tokens_per_second=info.decode_tokens_per_second,
        stage_only=info.stage_only, memory_budget=info.memory_budget, speed_source=info.speed_source,
        claims=[claimed_to_pb(c) for c in info.claims], step_tokens_per_second=info.step_tokens_per_second,
        activity=info.activity, activity_progress=info.activity_progress,
        allowed_models=list(info.allowed_models), stage_sessions=info.stage_sessions,
    )


def node_info_from_pb(msg: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(
        node_id=NodeId(msg.node_id), name=msg.name, version=msg.version,
        protocol_version=msg.protocol_version, pid=msg.pid, memory_total=msg.memory_total,
        memory_free=msg.memory_free, memory_limit=msg.memory_limit, threads=msg.threads,
        models=tuple(model_from_pb(m) for m in msg.models), files=tuple(model_from_pb(m) for m in msg.files),
        slots=msg.slots, max_queue=msg.max_queue, in_flight=msg.in_flight, draining=msg.draining,
        grpc_port=msg.grpc_port, metrics_port=msg.metrics_port, step_port=msg.step_port,
        stages=tuple(stage_from_pb(s) for s in msg.stages),
        decode_tokens_per_second=msg.decode_tokens_per_second,
        stage_only=msg.stage_only, memory_budget=msg.memory_budget,
        speed_source=msg.speed_source or STARTUP_PROBE, claims=tuple(claimed_from_pb(c) for c in msg.claims),
        step_tokens_per_second=msg.step_tokens_per_second, activity=msg.activity,
        activity_progress=msg.activity_progress,
        # Shown by the gateway: bounded, whatever a peer sends.
        allowed_models=tuple(sha[:64] for sha in msg.allowed_models[:MAX_ALLOWED_MODELS]),
        stage_sessions=msg.stage_sessions,
    )


def info_request(challenge: bytes) -> pb.InfoRequest:
    return pb.InfoRequest(challenge=challenge)


# ---------------------------------------------------------------------------- pipeline steps

_DTYPES: dict[ActivationDType, pb.DType] = {
    "f32": pb.DTYPE_F32, "f16": pb.DTYPE_F16, "q8_0": pb.DTYPE_Q8_0, "auto": pb.DTYPE_AUTO}
_TENSOR_DTYPES: dict[int, HiddenDType] = {pb.DTYPE_F32: "f32", pb.DTYPE_F16: "f16", pb.DTYPE_Q8_0: "q8_0"}
_POLICIES: dict[int, ActivationDType] = {**_TENSOR_DTYPES, pb.DTYPE_AUTO: "auto"}
_NUMPY_TYPES: dict[HiddenDType, type[np.floating[Any]]] = {"f32": np.float32, "f16": np.float16}
MAX_STEP_TOKENS = 4096  # far above a prefill chunk; bounds what one message may ask a stage to do


def tensor_to_pb(hidden: npt.NDArray[np.float32], dtype: HiddenDType) -> pb.Tensor:
    dtype = hidden_wire.wire_dtype(dtype, hidden)
    if dtype == "q8_0":
        data = hidden_wire.encode_q8_0(hidden)
    else:
        data = np.ascontiguousarray(hidden, dtype=np.dtype(_NUMPY_TYPES[dtype]).newbyteorder("<")).tobytes()
    return pb.Tensor(shape=list(hidden.shape), dtype=_DTYPES[dtype], data=data)


def activation_dtype_from_pb(code: int, what: str) -> ActivationDType:
    """A policy field (reply_dtype, activation_dtype); UNSPECIFIED is f32."""
    if code == pb.DTYPE_UNSPECIFIED:
        return "f32"
    policy = _POLICIES.get(code)
    if policy is None:
        raise InvalidInput(f"{what}: unknown dtype {code}")
    return policy


def _shape_text(shape: Sequence[int]) -> str:
    """A shape as the peer sent it, cut short: an error quotes it, and a status message must
    stay small whatever it quotes (a shape of 100,000 dimensions made a 1.2 MB one, past
    what gRPC clients accept in a trailer, so the caller saw RESOURCE_EXHAUSTED instead)."""
    if len(shape) <= 4:
        return str(list(shape))
    return f"[{', '.join(str(d) for d in shape[:4])}, ...] ({len(shape)} dimensions)"


def tensor_from_pb(msg: pb.Tensor) -> npt.NDArray[np.float32]:
    """Hidden states from the wire, checked for a consistent shape, dtype and byte length."""
    dtype = _TENSOR_DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidInput(f"hidden states: unsupported dtype {msg.dtype} (send DTYPE_F32, DTYPE_F16 or DTYPE_Q8_0)")
    if len(msg.shape) != 2 or msg.shape[0] == 0 or msg.shape[1] == 0:
        raise InvalidInput(f"hidden states must have shape [n_tokens, n_embd], got {_shape_text(msg.shape)}")
    shape = (int(msg.shape[0]), int(msg.shape[1]))
    if shape[0] > MAX_STEP_TOKENS:
        raise InvalidInput(f"hidden states of {shape[0]} tokens exceed the step limit of {MAX_STEP_TOKENS}")
    if dtype == "q8_0":
        array: npt.NDArray[Any] = hidden_wire.decode_q8_0(msg.data, shape)
    else:
        numpy_type = np.dtype(_NUMPY_TYPES[dtype]).newbyteorder("<")
        if len(msg.data) != shape[0] * shape[1] * numpy_type.itemsize:
            raise InvalidInput(f"hidden states: {len(msg.data)} bytes do not match shape {list(shape)} of {dtype}")
        array = np.frombuffer(msg.data, dtype=numpy_type).reshape(shape)
    out: npt.NDArray[np.float32] = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidInput("hidden states contain NaN or infinity")
    return out


def stage_step_to_pb(step: StageStep, hidden_dtype: HiddenDType = "f32") -> pb.ForwardRequest:
    """`hidden_dtype`: how the step's input travels (the sending link's pick from the policy)."""
    msg = pb.ForwardRequest(
        session_id=step.session_id, start_position=step.start_position, sampling=sampling_to_pb(step.sampling),
        logprobs=step.logprobs, reply_dtype=_DTYPES[step.reply_dtype], step=step.step,
        history_tokens=list(step.history), model_sha256=step.model_sha256, layers=layer_range_to_pb(step.layers),
        top_logprobs=step.top_logprobs,
        constraint=constraint_to_pb(step.constraint), constrained_tokens=list(step.generated))
    if step.tokens is not None:
        msg.tokens.ids.extend(step.tokens)
    elif step.hidden is not None:
        msg.hidden.CopyFrom(tensor_to_pb(step.hidden, hidden_dtype))
    return msg


def stage_step_from_pb(msg: pb.ForwardRequest) -> StageStep:
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidInput("a Forward step needs token ids or hidden states")
    if not msg.session_id or len(msg.session_id) > 128:
        raise InvalidInput("session_id must be 1 to 128 characters")
    if not msg.HasField("layers"):
        raise InvalidInput("a Forward step must name the stage's layer range")
    try:
        layers = layer_range_from_pb(msg.layers)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    tokens = tuple(msg.tokens.ids) if kind == "tokens" else None
    if tokens is not None and not 0 < len(tokens) <= MAX_STEP_TOKENS:
        raise InvalidInput(f"a step carries 1 to {MAX_STEP_TOKENS} token ids, got {len(tokens)}")
    if len(msg.constrained_tokens) > MAX_STEP_TOKENS:
        raise InvalidInput(f"a step carries at most {MAX_STEP_TOKENS} constrained_tokens")
    reply = activation_dtype_from_pb(msg.reply_dtype, "reply_dtype")
    return StageStep(
        session_id=msg.session_id, model_sha256=ModelSha(msg.model_sha256), layers=layers,
        start_position=msg.start_position, tokens=tokens,
        hidden=tensor_from_pb(msg.hidden) if kind == "hidden" else None,
        sampling=sampling_from_pb(msg.sampling), logprobs=msg.logprobs, reply_dtype=reply, step=msg.step,
        history=tuple(msg.history_tokens), top_logprobs=msg.top_logprobs,
        constraint=constraint_from_pb(msg.constraint, msg.HasField("constraint")),
        generated=tuple(msg.constrained_tokens))


def stage_output_to_pb(session_id: str, output: StageOutput, dtype: HiddenDType) -> pb.ForwardReply:
    if output.hidden is not None:
        return pb.ForwardReply(session_id=session_id, step=output.step, hidden=tensor_to_pb(output.hidden, dtype))
    assert output.token_id is not None
    return pb.ForwardReply(session_id=session_id, step=output.step,
                           token=pb.SampledToken(token_id=output.token_id, logprob=output.logprob,
                                                 top_logprobs=_top_to_pb(output.top_logprobs)))


def stage_output_from_pb(msg: pb.ForwardReply) -> StageOutput:
    kind = msg.WhichOneof("output")
    if kind == "hidden":
        return StageOutput(step=msg.step, hidden=tensor_from_pb(msg.hidden))
    if kind == "token":
        return StageOutput(step=msg.step, token_id=msg.token.token_id, logprob=msg.token.logprob,
                           top_logprobs=_top_from_pb(msg.token.top_logprobs))
    raise InvalidInput("a Forward reply carries neither hidden states nor a token")


MAX_PIPELINE_STAGES = 64
# Trailing metadata of a failed RunPipeline: the id of the later stage's node that failed.
FAILED_NODE_METADATA = "edgemesh-failed-node"
MAX_STEP_TIMEOUT_S = 600.0


def pipeline_job_to_pb(job: PipelineJob) -> pb.RunPipelineRequest:
    return pb.RunPipelineRequest(
        request=generate_request_to_pb(job.request), n_ctx=job.n_ctx, step_timeout_s=job.step_timeout_s,
        activation_dtype=_DTYPES[job.activation_dtype],
        stages=[pb.PipelineHop(node_id=hop.node_id, address=hop.address, layers=layer_range_to_pb(hop.layers))
                for hop in job.stages])


def pipeline_job_from_pb(msg: pb.RunPipelineRequest) -> PipelineJob:
    """Checks the shape of the request; whether the stages fit this node and the model is the
    head's to check."""
    if not 0 < len(msg.stages) <= MAX_PIPELINE_STAGES:
        raise InvalidInput(f"a pipeline has 1 to {MAX_PIPELINE_STAGES} stages, got {len(msg.stages)}")
    hops: list[PipelineHop] = []
    for index, hop in enumerate(msg.stages):
        # Node ids travel back in status metadata, which takes printable ASCII only.
        if not 0 < len(hop.node_id) <= 64 or not (hop.node_id.isascii() and hop.node_id.isprintable()):
            raise InvalidInput(f"stage {index} needs a node id of 1 to 64 printable ASCII characters")
        if not 0 < len(hop.address) <= 256:
            raise InvalidInput(f"stage {index} needs an address of 1 to 256 characters")
        try:
            layers = layer_range_from_pb(hop.layers)
        except ValueError as exc:
            raise InvalidInput(f"stage {index}: {exc}") from None
        if hops and layers.first != hops[-1].layers.last_exclusive:
            raise InvalidInput(f"stage {index} starts at layer {layers.first}; the stage before it ends at "
                               f"{hops[-1].layers.last_exclusive}")
        hops.append(PipelineHop(NodeId(hop.node_id), hop.address, layers))
    if hops[0].layers.first != 0:
        raise InvalidInput("stage 0 must start at layer 0")
    if not 0 < msg.step_timeout_s <= MAX_STEP_TIMEOUT_S:
        raise InvalidInput(f"step_timeout_s must be in (0, {MAX_STEP_TIMEOUT_S:.0f}], got {msg.step_timeout_s}")
    request = generate_request_from_pb(msg.request)
    if not request.model_sha256:
        raise InvalidInput("a pipeline request must name its model's sha256")
    if not request.prompt_tokens or request.max_tokens <= 0:
        raise InvalidInput("a pipeline request needs prompt tokens and max_tokens > 0")
    if msg.n_ctx == 0:
        raise InvalidInput("n_ctx must be positive")
    return PipelineJob(request=request, stages=tuple(hops), n_ctx=msg.n_ctx, step_timeout_s=msg.step_timeout_s,
                       activation_dtype=activation_dtype_from_pb(msg.activation_dtype, "activation_dtype"))


def load_stage_request_to_pb(model_sha256: str, layers: LayerRange, n_ctx: int, slots: int,
                             prefill_chunk: int = 0, controller_id: str = "",
                             shard_sources: tuple[str, ...] = ()) -> pb.LoadStageRequest:
    return pb.LoadStageRequest(model_sha256=model_sha256, layers=layer_range_to_pb(layers), n_ctx=n_ctx,
                               slots=slots, prefill_chunk=prefill_chunk, controller_id=controller_id,
                               shard_sources=list(shard_sources))


def load_model_request_to_pb(model_sha256: str, n_ctx: int, controller_id: str) -> pb.LoadModelRequest:
    return pb.LoadModelRequest(model_sha256=model_sha256, n_ctx=n_ctx, controller_id=controller_id)


def load_model_reply_to_pb(model: ModelHeld) -> pb.LoadModelReply:
    return pb.LoadModelReply(model=model_to_pb(model))


def release_holding_request_to_pb(model_sha256: str, layers: LayerRange | None,
                                  controller_id: str) -> pb.ReleaseHoldingRequest:
    """`layers` None: the whole-model replica."""
    msg = pb.ReleaseHoldingRequest(model_sha256=model_sha256, replica=layers is None, controller_id=controller_id)
    if layers is not None:
        msg.layers.CopyFrom(layer_range_to_pb(layers))
    return msg


def release_holding_from_pb(msg: pb.ReleaseHoldingRequest) -> tuple[ModelSha, LayerRange | None, str]:
    """(model, layers or None for the replica, controller id), checked."""
    if not msg.model_sha256:
        raise InvalidInput("a release must name its model's sha256")
    if msg.replica:
        return ModelSha(msg.model_sha256), None, msg.controller_id
    if not msg.HasField("layers"):
        raise InvalidInput("a stage release needs its layer range (or replica: true)")
    try:
        return ModelSha(msg.model_sha256), layer_range_from_pb(msg.layers), msg.controller_id
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


def release_holding_reply_to_pb(released: bool, pending: bool) -> pb.ReleaseHoldingReply:
    return pb.ReleaseHoldingReply(released=released, pending=pending)


def claim_request_to_pb(model_sha256: str, controller_id: str, ttl_s: float, give_up: bool = False) -> pb.ClaimRequest:
    return pb.ClaimRequest(model_sha256=model_sha256, controller_id=controller_id, ttl_s=ttl_s, give_up=give_up)


def claim_reply_to_pb(granted: bool, holder: str, expires_in_s: float) -> pb.ClaimReply:
    return pb.ClaimReply(granted=granted, holder=holder, expires_in_s=expires_in_s)


def load_stage_reply_to_pb(held: StageHeld) -> pb.LoadStageReply:
    return pb.LoadStageReply(stage=stage_to_pb(held))


def fetch_shard_request_to_pb(model_sha256: str, ranges: list[tuple[int, int]], header: bool) -> pb.FetchShardRequest:
    return pb.FetchShardRequest(model_sha256=model_sha256, header=header,
                                ranges=[pb.ByteRange(offset=o, length=n) for o, n in ranges])


def shard_chunk_to_pb(offset: int, data: bytes, *, range_sha256: str = "", range_offset: int = 0,
                      range_length: int = 0, file_bytes: int = 0) -> pb.ShardChunk:
    return pb.ShardChunk(offset=offset, data=data, range_sha256=range_sha256, range_offset=range_offset,
                         range_length=range_length, file_bytes=file_bytes)


def shard_chunk_from_pb(msg: pb.ShardChunk) -> ShardChunk:
    return ShardChunk(offset=msg.offset, data=msg.data, range_sha256=msg.range_sha256,
                      range_offset=msg.range_offset, range_length=msg.range_length, file_bytes=msg.file_bytes)


def embed_request_to_pb(batch: EmbedBatch) -> pb.EmbedRequest:
    return pb.EmbedRequest(request_id=batch.request_id, model_sha256=batch.model_sha256,
                           inputs=[pb.TokenIds(ids=list(tokens)) for tokens in batch.inputs])


def embed_request_from_pb(msg: pb.EmbedRequest) -> EmbedBatch:
    return EmbedBatch(request_id=RequestId(msg.request_id), model_sha256=ModelSha(msg.model_sha256),
                      inputs=tuple(tuple(i.ids) for i in msg.inputs))


def embed_reply_to_pb(embeddings: Embeddings) -> pb.EmbedReply:
    vectors = embeddings.vectors
    return pb.EmbedReply(n_embd=int(vectors.shape[1]), values=vectors.ravel().tolist(), pooling=embeddings.pooling)


def embed_reply_from_pb(msg: pb.EmbedReply, n_inputs: int) -> Embeddings:
    """The reply's vectors; InvalidInput when they do not come as n_inputs rows of n_embd."""
    values = np.asarray(msg.values, dtype=np.float32)
    if msg.n_embd == 0 or values.size != n_inputs * msg.n_embd:
        raise InvalidInput(f"an EmbedReply of {values.size} values is not {n_inputs} vectors of {msg.n_embd}")
    return Embeddings(vectors=values.reshape(n_inputs, msg.n_embd), pooling=msg.pooling)
