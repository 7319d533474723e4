"""Domain types shared by the mesh and the node: frozen dataclasses and NewType ids.

Protobuf classes never travel past mesh/transport and node/service; everything else
speaks in these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NewType, get_args

import numpy as np
import numpy.typing as npt

NodeId = NewType("NodeId", str)
RequestId = NewType("RequestId", str)
ModelSha = NewType("ModelSha", str)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from logits. temperature <= 0 means greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    frequency_penalty: float = 0.0  # minus count * this, for each time a token is in the window
    presence_penalty: float = 0.0  # minus this, once, for a token in the window
    # (token id, bias added to its logit), sorted by id so that the params stay hashable
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalised(self) -> bool:
        """Any penalty on the recent history is active (so the sampler needs that history)."""
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position, under the model's raw logits."""

    token_id: int
    logprob: float


ConstraintKind = Literal["json_object", "json_schema", "lark"]
CONSTRAINT_KINDS: tuple[ConstraintKind, ...] = ("json_object", "json_schema", "lark")


@dataclass(frozen=True)
class Constraint:
    """A grammar the generated text must follow (see mesh.constraints): any JSON object, a JSON
    schema (`grammar` is its JSON text), or a Lark grammar (llguidance's dialect; tool calls)."""

    kind: ConstraintKind
    grammar: str = ""


@dataclass(frozen=True)
class LayerRange:
    """Transformer blocks [first, last_exclusive) of a model."""

    first: int
    last_exclusive: int

    def __post_init__(self) -> None:
        if self.first < 0 or self.last_exclusive <= self.first:
            raise ValueError(f"invalid layer range [{self.first}, {self.last_exclusive})")

    @property
    def count(self) -> int:
        return self.last_exclusive - self.first

    def as_list(self) -> list[int]:
        return [self.first, self.last_exclusive]


@dataclass(frozen=True)
class ModelHeld:
    """A GGUF model a node has loaded."""

    name: str
    sha256: ModelSha
    n_layers: int
    file_bytes: int
    n_ctx: int
    architecture: str
    n_vocab: int
    shard_copy: bool = False  # only some layers' bytes are on disk: it serves stages, never a replica


@dataclass(frozen=True)
class StageHeld:
    """A layer range of a model a node has loaded as a pipeline stage."""

    model_sha256: ModelSha
    layers: LayerRange
    slots: int
    weight_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    prefill_chunk: int = 512
    n_ctx: int = 0  # context length of each session (0 = not reported)


@dataclass(frozen=True)
class Claimed:
    """A placement controller's lease on a node for one model (see mesh.placement.controller)."""

    model_sha256: ModelSha
    controller_id: str
    expires_in_s: float


# Where a node's decode_tokens_per_second comes from. A start-up probe often runs while the
# device loads a model or its neighbours on the same machine probe too; an idle probe runs
# after quiet (node.speed). Only idle probes compare across nodes.
STARTUP_PROBE = "start-up probe"
IDLE_PROBE = "idle probe"


@dataclass(frozen=True)
class NodeInfo:
    """What a node says about itself (the Info RPC)."""

    node_id: NodeId
    name: str
    version: str
    protocol_version: int
    pid: int
    memory_total: int
    memory_free: int
    memory_limit: int
    threads: int
    models: tuple[ModelHeld, ...]
    slots: int
    max_queue: int
    in_flight: int
    draining: bool
    grpc_port: int
    metrics_port: int
    stages: tuple[StageHeld, ...] = ()
    decode_tokens_per_second: float = 0.0
    files: tuple[ModelHeld, ...] = ()  # GGUF files stages can be loaded from
    step_port: int = 0  # the step socket (mesh.transport.step_socket); 0 = none, heads use Forward
    stage_only: bool = False  # started with --role stage: never a whole-model replica
    memory_budget: int = 0  # bytes it may use for models, counting what it holds now (0 = not reported)
    speed_source: str = STARTUP_PROBE  # or IDLE_PROBE: where decode_tokens_per_second comes from
    step_tokens_per_second: float = 0.0  # real decode steps, scaled to the whole model (0 = none yet)
    activity: str = ""  # what the node is busy with now (a shard transfer, a load); empty: nothing
    activity_progress: float = -1.0  # 0..1, or -1 when it has no measure of progress
    claims: tuple[Claimed, ...] = ()  # placement claims held on the node, one per model
    allowed_models: tuple[str, ...] = ()  # its --allow-model sha256s; empty: any model
    stage_sessions: int = 0  # sessions a stage it loads is sized for (0 = not reported: slots)

    @property
    def capacity(self) -> int:
        """Requests the node accepts at once: running plus queued."""
        return self.slots + self.max_queue


@dataclass(frozen=True)
class GenerationRequest:
    """One request for tokens, as the scheduler hands it to a placement."""

    request_id: RequestId
    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: frozenset[int]
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives to report per token (0..20)
    model_sha256: ModelSha = ModelSha("")
    # Already generated before a failover; evaluated one per step, not streamed again.
    replay_tokens: tuple[int, ...] = ()
    constraint: Constraint | None = None


# Inputs in one Embed call: a request with more is split into calls of this many, which the
# scheduler spreads over the replicas (and a node refuses more).
EMBED_BATCH_INPUTS = 16
# Tokens a node's embedding context holds: the longest input it embeds. Pooling needs every
# token as an output, and llama.cpp computes the logits of each output as well, so the context
# costs about 2 x 4 x vocabulary bytes per token (measured on SmolLM2-135M, vocabulary 49,152:
# about 150 MiB at 512 tokens, 820 MiB at 2,048); 512 covers the chunks RAG front ends embed.
EMBED_CONTEXT_TOKENS = 512


@dataclass(frozen=True)
class EmbedBatch:
    """A few inputs (token ids) to embed on one replica: one pooled vector each."""

    request_id: RequestId
    inputs: tuple[tuple[int, ...], ...]
    model_sha256: ModelSha = ModelSha("")


@dataclass(frozen=True, eq=False)
class Embeddings:
    """The vectors of an EmbedBatch, one row per input (L2-normalized), and how they were pooled."""

    vectors: npt.NDArray[np.float32]  # shape (inputs, n_embd)
    pooling: str  # "mean", "cls" or "last"


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; finish_reason is set on the last one."""

    token_id: int
    position: int
    logprob: float = 0.0
    finish_reason: FinishReason | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class StagePlacement:
    """One stage of a placement: a node and the layers it serves."""

    node_id: NodeId
    layers: LayerRange


@dataclass(frozen=True)
class Placement:
    """Where a model runs: one replica node, or a pipeline of stages covering all layers."""

    kind: Literal["replica", "pipeline"]
    model_sha256: ModelSha
    model_name: str
    stages: tuple[StagePlacement, ...] = field(default_factory=tuple)

    @property
    def node_ids(self) -> tuple[NodeId, ...]:
        return tuple(stage.node_id for stage in self.stages)


HiddenDType = Literal["f32", "f16", "q8_0"]  # how hidden states travel on a link (mesh.transport.hidden_wire)
# What a pipeline allows: one encoding on every hop, or "auto", each sender's pick for its link.
ActivationDType = Literal["f32", "f16", "q8_0", "auto"]
ACTIVATION_DTYPES: tuple[ActivationDType, ...] = get_args(ActivationDType)


@dataclass(frozen=True)
class PipelineHop:
    """One stage of a pipeline as its head (the node of stage 0) reaches it."""

    node_id: NodeId
    address: str
    layers: LayerRange


@dataclass(frozen=True)
class RingHop:
    """Where a stage of a ring hands its output: the step socket of the next stage's node."""

    node_id: NodeId
    host: str
    step_port: int


@dataclass(frozen=True)
class PipelineJob:
    """A whole pipeline request, handed to the node of stage 0 (see node.pipeline_head)."""

    request: GenerationRequest
    stages: tuple[PipelineHop, ...]
    n_ctx: int
    step_timeout_s: float = 5.0
    activation_dtype: ActivationDType = "f32"


@dataclass(frozen=True, eq=False)
class StageStep:
    """One step of one session through one pipeline stage: token ids into the first stage,
    hidden states ([n_tokens, n_embd], float32 in memory) into the others."""

    session_id: str
    model_sha256: ModelSha
    layers: LayerRange
    start_position: int
    tokens: tuple[int, ...] | None
    hidden: npt.NDArray[np.float32] | None
    sampling: SamplingParams
    logprobs: bool = False
    # The pipeline's activation dtype, on every step of a run: the stage sends its output on
    # (or back) in it, resolved per link where it is "auto"; a link sends the step's input in it too.
    reply_dtype: ActivationDType = "f32"
    step: int = 0
    history: tuple[int, ...] = ()  # recent tokens, for the penalties on the last stage
    top_logprobs: int = 0
    # Last stage only: the session's grammar (on its first step), and the generated tokens
    # appended since the previous step, which the stage's matcher consumes before sampling.
    constraint: Constraint | None = None
    generated: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        if self.tokens is not None:
            return len(self.tokens)
        return 0 if self.hidden is None else int(self.hidden.shape[0])


@dataclass(frozen=True, eq=False)
class StageOutput:
    """What a stage returns: hidden states for the next stage, or (last stage) the sampled token."""

    step: int
    hidden: npt.NDArray[np.float32] | None = None
    token_id: int | None = None
    logprob: float = 0.0
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ShardChunk:
    """Bytes of a model file at `offset`, as FetchShard streams them (node.shards writes them
    into a sparse copy). The last chunk of a requested range carries that range's sha256."""

    offset: int
    data: bytes
    range_sha256: str = ""  # set on the last chunk of a range
    range_offset: int = 0
    range_length: int = 0
    file_bytes: int = 0
