"""Protobuf <-> domain conversion, in one place, so protobuf never leaks past the edges."""

from __future__ import annotations

from typing import Any

from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.types import (
    FinishReason,
    GenerationRequest,
    LayerRange,
    ModelHeld,
    ModelSha,
    NodeId,
    NodeInfo,
    RequestId,
    SamplingParams,
    StageHeld,
    TokenEvent,
)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def sampling_to_pb(params: SamplingParams) -> Any:
    return pb.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
        repeat_penalty=params.repeat_penalty, seed=params.seed, repeat_last_n=params.repeat_last_n,
    )


def sampling_from_pb(msg: Any) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, min_p=msg.min_p,
        repeat_penalty=msg.repeat_penalty, seed=msg.seed, repeat_last_n=msg.repeat_last_n,
    )


def generate_request_to_pb(req: GenerationRequest) -> Any:
    return pb.GenerateRequest(
        request_id=req.request_id, model_sha256=req.model_sha256, prompt_tokens=list(req.prompt_tokens),
        sampling=sampling_to_pb(req.sampling), max_tokens=req.max_tokens,
        stop_token_ids=sorted(req.stop_token_ids), logprobs=req.logprobs,
        replay_tokens=list(req.replay_tokens),
    )


def generate_request_from_pb(msg: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id=RequestId(msg.request_id), prompt_tokens=tuple(msg.prompt_tokens),
        sampling=sampling_from_pb(msg.sampling), max_tokens=msg.max_tokens,
        stop_token_ids=frozenset(msg.stop_token_ids), logprobs=msg.logprobs,
        replay_tokens=tuple(msg.replay_tokens),
        model_sha256=ModelSha(msg.model_sha256),
    )


def token_event_to_pb(event: TokenEvent) -> Any:
    return pb.GenerateEvent(token_id=event.token_id, logprob=event.logprob, position=event.position,
                            finish_reason=event.finish_reason or "")


def token_event_from_pb(msg: Any) -> TokenEvent:
    return TokenEvent(token_id=msg.token_id, position=msg.position, logprob=msg.logprob,
                      finish_reason=_FINISH.get(msg.finish_reason))


def layer_range_to_pb(layers: LayerRange) -> Any:
    return pb.LayerRange(first=layers.first, last_exclusive=layers.last_exclusive)


def layer_range_from_pb(msg: Any) -> LayerRange:
    return LayerRange(msg.first, msg.last_exclusive)


def stage_to_pb(stage: StageHeld) -> Any:
    return pb.StageHeld(model_sha256=stage.model_sha256, layers=layer_range_to_pb(stage.layers),
                        slots=stage.slots, weight_bytes=stage.weight_bytes,
                        kv_cache_bytes=stage.kv_cache_bytes, compute_bytes=stage.compute_bytes)


def stage_from_pb(msg: Any) -> StageHeld:
    return StageHeld(model_sha256=ModelSha(msg.model_sha256), layers=layer_range_from_pb(msg.layers),
                     slots=msg.slots, weight_bytes=msg.weight_bytes, kv_cache_bytes=msg.kv_cache_bytes,
                     compute_bytes=msg.compute_bytes)


def node_info_to_pb(info: NodeInfo) -> Any:
    return pb.NodeInfo(
        node_id=info.node_id, name=info.name, version=info.version, protocol_version=info.protocol_version,
        pid=info.pid, memory_total=info.memory_total, memory_free=info.memory_free,
        memory_limit=info.memory_limit, threads=info.threads,
        models=[pb.ModelHeld(name=m.name, sha256=m.sha256, n_layers=m.n_layers, file_bytes=m.file_bytes,
                             n_ctx=m.n_ctx, architecture=m.architecture, n_vocab=m.n_vocab)
                for m in info.models],
        slots=info.slots, max_queue=info.max_queue, in_flight=info.in_flight, draining=info.draining,
        grpc_port=info.grpc_port, metrics_port=info.metrics_port,
        stages=[stage_to_pb(s) for s in info.stages],
        decode_tokens_per_second=info.decode_tokens_per_second,
    )


def node_info_from_pb(msg: Any) -> NodeInfo:
    return NodeInfo(
        node_id=NodeId(msg.node_id), name=msg.name, version=msg.version,
        protocol_version=msg.protocol_version, pid=msg.pid, memory_total=msg.memory_total,
        memory_free=msg.memory_free, memory_limit=msg.memory_limit, threads=msg.threads,
        models=tuple(ModelHeld(name=m.name, sha256=ModelSha(m.sha256), n_layers=m.n_layers,
                               file_bytes=m.file_bytes, n_ctx=m.n_ctx, architecture=m.architecture,
                               n_vocab=m.n_vocab) for m in msg.models),
        slots=msg.slots, max_queue=msg.max_queue, in_flight=msg.in_flight, draining=msg.draining,
        grpc_port=msg.grpc_port, metrics_port=msg.metrics_port,
        stages=tuple(stage_from_pb(s) for s in msg.stages),
        decode_tokens_per_second=msg.decode_tokens_per_second,
    )


def info_request() -> Any:
    return pb.InfoRequest()
