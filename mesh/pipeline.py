"""Drive one session through the stages of a pipeline placement.

The gateway is the hub: it sends stage 0 the token ids, hands each stage's hidden states
to the next, and gets the sampled token from the last stage, over one long-lived Forward
stream per stage. Prefill goes in chunks (as llama.cpp batches a prompt, so the numbers
match its own), then one token per step. A failover replay evaluates the tokens already
generated one per step too, so the continuation is what the failed pipeline would have
produced. Every stage's slot is freed when the run ends, however it ends: closing the
streams makes each node release the sessions opened on them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mesh.errors import PeerError
from mesh.metrics import GatewayMetrics
from mesh.transport.channels import NodeClient, StageStream
from mesh.types import (
    FinishReason,
    GenerationRequest,
    HiddenDType,
    ModelSha,
    Placement,
    StageOutput,
    StageStep,
    TokenEvent,
)

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512  # llama.cpp's default n_batch: the prompt is evaluated in the same batches


@dataclass(frozen=True)
class PipelineOptions:
    n_ctx: int
    hidden_dtype: HiddenDType = "f32"
    step_timeout_s: float = 5.0  # a decode step slower than this counts as a failed stage


class PipelineRun:
    def __init__(self, placement: Placement, clients: Sequence[NodeClient], options: PipelineOptions,
                 metrics: GatewayMetrics) -> None:
        if len(clients) != len(placement.stages):
            raise ValueError("one client per stage")
        self._placement = placement
        self._clients = clients
        self._options = options
        self._metrics = metrics
        self._streams: list[StageStream] = []
        self._step = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        session_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"  # fresh per attempt: replays never collide
        self._streams = [client.open_forward(self._options.step_timeout_s) for client in self._clients]
        try:
            history = list(request.prompt_tokens)
            out = StageOutput(step=-1)
            for lo in range(0, len(history), PREFILL_CHUNK):
                out = await self._through(session_id, request, history[lo:lo + PREFILL_CHUNK], lo, history)
            for token in request.replay_tokens:  # one per step, as they were first generated
                history.append(token)
                out = await self._through(session_id, request, [token], len(history) - 1, history)
            produced = len(request.replay_tokens)
            while True:
                assert out.token_id is not None
                position = len(history)
                history.append(out.token_id)
                produced += 1
                finish: FinishReason | None = None
                if out.token_id in request.stop_token_ids:
                    finish = "stop"
                elif produced >= request.max_tokens or position + 1 >= self._options.n_ctx:
                    finish = "length"
                yield TokenEvent(token_id=out.token_id, position=position, logprob=out.logprob,
                                 finish_reason=finish)
                if finish is not None:
                    return
                out = await self._through(session_id, request, [out.token_id], position, history)
        finally:
            for stream in self._streams:
                stream.close()

    async def _through(self, session_id: str, request: GenerationRequest, tokens: list[int], start: int,
                       history: list[int]) -> StageOutput:
        """One step through every stage; returns the last stage's sampled token."""
        self._step += 1
        sampling = request.sampling
        # The penalty window is all the last stage needs of the history.
        window = sampling.repeat_last_n if sampling.repeat_penalty != 1.0 else 0
        recent = tuple(history[-window:]) if window > 0 else ()
        hidden: npt.NDArray[np.float32] | None = None
        out = StageOutput(step=self._step)
        last = len(self._streams) - 1
        for index, stream in enumerate(self._streams):
            stage = self._placement.stages[index]
            step = StageStep(
                session_id=session_id, model_sha256=ModelSha(self._placement.model_sha256), layers=stage.layers,
                start_position=start, tokens=tuple(tokens) if index == 0 else None, hidden=hidden,
                sampling=sampling, logprobs=request.logprobs, reply_dtype=self._options.hidden_dtype,
                step=self._step, history=recent if index == last else ())
            try:
                out = await stream.step(step)
            except PeerError as exc:
                exc.node_id = stage.node_id  # so the scheduler replaces this stage's node, not the whole chain
                raise
            if index < last:
                if out.hidden is None or out.hidden.shape[0] != len(tokens):
                    raise PeerError(f"stage {index} on {stream.address} returned no hidden states for "
                                    f"{len(tokens)} tokens", retryable=False)
                hidden = out.hidden
                self._metrics.stage_bytes.labels("sent").inc(hidden.nbytes)
        if out.token_id is None:
            raise PeerError(f"the last stage on {self._streams[last].address} returned no token", retryable=False)
        return out
