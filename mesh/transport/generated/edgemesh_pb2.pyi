from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_Q8_0: _ClassVar[DType]
    DTYPE_AUTO: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_F32: DType
DTYPE_F16: DType
DTYPE_Q8_0: DType
DTYPE_AUTO: DType

class InfoRequest(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class ModelHeld(_message.Message):
    __slots__ = ("name", "sha256", "n_layers", "file_bytes", "n_ctx", "architecture", "n_vocab", "shard_copy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    N_VOCAB_FIELD_NUMBER: _ClassVar[int]
    SHARD_COPY_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    n_layers: int
    file_bytes: int
    n_ctx: int
    architecture: str
    n_vocab: int
    shard_copy: bool
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., n_layers: _Optional[int] = ..., file_bytes: _Optional[int] = ..., n_ctx: _Optional[int] = ..., architecture: _Optional[str] = ..., n_vocab: _Optional[int] = ..., shard_copy: _Optional[bool] = ...) -> None: ...

class LayerRange(_message.Message):
    __slots__ = ("first", "last_exclusive")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    first: int
    last_exclusive: int
    def __init__(self, first: _Optional[int] = ..., last_exclusive: _Optional[int] = ...) -> None: ...

class StageHeld(_message.Message):
    __slots__ = ("model_sha256", "layers", "slots", "weight_bytes", "kv_cache_bytes", "compute_bytes", "prefill_chunk", "n_ctx")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    layers: LayerRange
    slots: int
    weight_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    prefill_chunk: int
    n_ctx: int
    def __init__(self, model_sha256: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., slots: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., compute_bytes: _Optional[int] = ..., prefill_chunk: _Optional[int] = ..., n_ctx: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "version", "protocol_version", "pid", "memory_total", "memory_free", "memory_limit", "threads", "models", "slots", "max_queue", "in_flight", "draining", "grpc_port", "metrics_port", "stages", "decode_tokens_per_second", "files", "proof", "step_port", "stage_only", "memory_budget", "speed_source", "claims", "step_tokens_per_second", "activity", "activity_progress", "allowed_models", "stage_sessions")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    STEP_PORT_FIELD_NUMBER: _ClassVar[int]
    STAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    SPEED_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    STEP_TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    version: str
    protocol_version: int
    pid: int
    memory_total: int
    memory_free: int
    memory_limit: int
    threads: int
    models: _containers.RepeatedCompositeFieldContainer[ModelHeld]
    slots: int
    max_queue: int
    in_flight: int
    draining: bool
    grpc_port: int
    metrics_port: int
    stages: _containers.RepeatedCompositeFieldContainer[StageHeld]
    decode_tokens_per_second: float
    files: _containers.RepeatedCompositeFieldContainer[ModelHeld]
    proof: str
    step_port: int
    stage_only: bool
    memory_budget: int
    speed_source: str
    claims: _containers.RepeatedCompositeFieldContainer[Claimed]
    step_tokens_per_second: float
    activity: str
    activity_progress: float
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    stage_sessions: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., pid: _Optional[int] = ..., memory_total: _Optional[int] = ..., memory_free: _Optional[int] = ..., memory_limit: _Optional[int] = ..., threads: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelHeld, _Mapping]]] = ..., slots: _Optional[int] = ..., max_queue: _Optional[int] = ..., in_flight: _Optional[int] = ..., draining: _Optional[bool] = ..., grpc_port: _Optional[int] = ..., metrics_port: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageHeld, _Mapping]]] = ..., decode_tokens_per_second: _Optional[float] = ..., files: _Optional[_Iterable[_Union[ModelHeld, _Mapping]]] = ..., proof: _Optional[str] = ..., step_port: _Optional[int] = ..., stage_only: _Optional[bool] = ..., memory_budget: _Optional[int] = ..., speed_source: _Optional[str] = ..., claims: _Optional[_Iterable[_Union[Claimed, _Mapping]]] = ..., step_tokens_per_second: _Optional[float] = ..., activity: _Optional[str] = ..., activity_progress: _Optional[float] = ..., allowed_models: _Optional[_Iterable[str]] = ..., stage_sessions: _Optional[int] = ...) -> None: ...

class Claimed(_message.Message):
    __slots__ = ("model_sha256", "controller_id", "expires_in_s")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    controller_id: str
    expires_in_s: float
    def __init__(self, model_sha256: _Optional[str] = ..., controller_id: _Optional[str] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "repeat_last_n", "frequency_penalty", "presence_penalty", "logit_bias")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPEAT_LAST_N_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    seed: int
    repeat_last_n: int
    frequency_penalty: float
    presence_penalty: float
    logit_bias: _containers.RepeatedCompositeFieldContainer[LogitBias]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repeat_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., repeat_last_n: _Optional[int] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., logit_bias: _Optional[_Iterable[_Union[LogitBias, _Mapping]]] = ...) -> None: ...

class LogitBias(_message.Message):
    __slots__ = ("token_id", "bias")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    bias: float
    def __init__(self, token_id: _Optional[int] = ..., bias: _Optional[float] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model_sha256", "prompt_tokens", "sampling", "max_tokens", "stop_token_ids", "logprobs", "replay_tokens", "top_logprobs", "constraint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_sha256: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: bool
    replay_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: int
    constraint: Constraint
    def __init__(self, request_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[bool] = ..., replay_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[int] = ..., constraint: _Optional[_Union[Constraint, _Mapping]] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("kind", "grammar")
    KIND_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    kind: str
    grammar: str
    def __init__(self, kind: _Optional[str] = ..., grammar: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("token_id", "logprob", "position", "finish_reason", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    position: int
    finish_reason: str
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., position: _Optional[int] = ..., finish_reason: _Optional[str] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("model_sha256", "layers", "n_ctx", "slots", "prefill_chunk", "controller_id", "shard_sources")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_SOURCES_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    layers: LayerRange
    n_ctx: int
    slots: int
    prefill_chunk: int
    controller_id: str
    shard_sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_sha256: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., n_ctx: _Optional[int] = ..., slots: _Optional[int] = ..., prefill_chunk: _Optional[int] = ..., controller_id: _Optional[str] = ..., shard_sources: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadStageReply(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: StageHeld
    def __init__(self, stage: _Optional[_Union[StageHeld, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "start_position", "tokens", "hidden", "sampling", "logprobs", "reply_dtype", "step", "history_tokens", "model_sha256", "layers", "top_logprobs", "constraint", "constrained_tokens", "onward", "route", "reply_on_return")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REPLY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ONWARD_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REPLY_ON_RETURN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_position: int
    tokens: TokenIds
    hidden: Tensor
    sampling: SamplingParams
    logprobs: bool
    reply_dtype: DType
    step: int
    history_tokens: _containers.RepeatedScalarFieldContainer[int]
    model_sha256: str
    layers: LayerRange
    top_logprobs: int
    constraint: Constraint
    constrained_tokens: _containers.RepeatedScalarFieldContainer[int]
    onward: _containers.RepeatedScalarFieldContainer[bytes]
    route: _containers.RepeatedCompositeFieldContainer[RingHop]
    reply_on_return: bool
    def __init__(self, session_id: _Optional[str] = ..., start_position: _Optional[int] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., logprobs: _Optional[bool] = ..., reply_dtype: _Optional[_Union[DType, str]] = ..., step: _Optional[int] = ..., history_tokens: _Optional[_Iterable[int]] = ..., model_sha256: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., top_logprobs: _Optional[int] = ..., constraint: _Optional[_Union[Constraint, _Mapping]] = ..., constrained_tokens: _Optional[_Iterable[int]] = ..., onward: _Optional[_Iterable[bytes]] = ..., route: _Optional[_Iterable[_Union[RingHop, _Mapping]]] = ..., reply_on_return: _Optional[bool] = ...) -> None: ...

class RingHop(_message.Message):
    __slots__ = ("node_id", "host", "step_port")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STEP_PORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host: str
    step_port: int
    def __init__(self, node_id: _Optional[str] = ..., host: _Optional[str] = ..., step_port: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("session_id", "step", "hidden", "token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    hidden: Tensor
    token: SampledToken
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., token: _Optional[_Union[SampledToken, _Mapping]] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("token_id", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class PipelineHop(_message.Message):
    __slots__ = ("node_id", "address", "layers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    layers: LayerRange
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ...) -> None: ...

class RunPipelineRequest(_message.Message):
    __slots__ = ("request", "stages", "n_ctx", "step_timeout_s", "activation_dtype")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    stages: _containers.RepeatedCompositeFieldContainer[PipelineHop]
    n_ctx: int
    step_timeout_s: float
    activation_dtype: DType
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[PipelineHop, _Mapping]]] = ..., n_ctx: _Optional[int] = ..., step_timeout_s: _Optional[float] = ..., activation_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model_sha256", "n_ctx", "controller_id")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    n_ctx: int
    controller_id: str
    def __init__(self, model_sha256: _Optional[str] = ..., n_ctx: _Optional[int] = ..., controller_id: _Optional[str] = ...) -> None: ...

class LoadModelReply(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelHeld
    def __init__(self, model: _Optional[_Union[ModelHeld, _Mapping]] = ...) -> None: ...

class ReleaseHoldingRequest(_message.Message):
    __slots__ = ("model_sha256", "layers", "replica", "controller_id")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    layers: LayerRange
    replica: bool
    controller_id: str
    def __init__(self, model_sha256: _Optional[str] = ..., layers: _Optional[_Union[LayerRange, _Mapping]] = ..., replica: _Optional[bool] = ..., controller_id: _Optional[str] = ...) -> None: ...

class ReleaseHoldingReply(_message.Message):
    __slots__ = ("released", "pending")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    released: bool
    pending: bool
    def __init__(self, released: _Optional[bool] = ..., pending: _Optional[bool] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("model_sha256", "controller_id", "ttl_s", "give_up")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    GIVE_UP_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    controller_id: str
    ttl_s: float
    give_up: bool
    def __init__(self, model_sha256: _Optional[str] = ..., controller_id: _Optional[str] = ..., ttl_s: _Optional[float] = ..., give_up: _Optional[bool] = ...) -> None: ...

class ClaimReply(_message.Message):
    __slots__ = ("granted", "holder", "expires_in_s")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    holder: str
    expires_in_s: float
    def __init__(self, granted: _Optional[bool] = ..., holder: _Optional[str] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class ByteRange(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FetchShardRequest(_message.Message):
    __slots__ = ("model_sha256", "header", "ranges")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RANGES_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    header: bool
    ranges: _containers.RepeatedCompositeFieldContainer[ByteRange]
    def __init__(self, model_sha256: _Optional[str] = ..., header: _Optional[bool] = ..., ranges: _Optional[_Iterable[_Union[ByteRange, _Mapping]]] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("offset", "data", "range_sha256", "range_offset", "range_length", "file_bytes")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RANGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    RANGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    RANGE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    range_sha256: str
    range_offset: int
    range_length: int
    file_bytes: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., range_sha256: _Optional[str] = ..., range_offset: _Optional[int] = ..., range_length: _Optional[int] = ..., file_bytes: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "model_sha256", "inputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_sha256: str
    inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, request_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class EmbedReply(_message.Message):
    __slots__ = ("n_embd", "values", "pooling")
    N_EMBD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    n_embd: int
    values: _containers.RepeatedScalarFieldContainer[float]
    pooling: str
    def __init__(self, n_embd: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., pooling: _Optional[str] = ...) -> None: ...
