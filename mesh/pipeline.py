"""Drive one session through the stages of a pipeline.

The head of a pipeline (the node of stage 0, see node.pipeline_head) runs this: it feeds its
own layers the token ids, sends each later stage the hidden states of the one before over a
connection of the run's own (the step socket, or a Forward stream), and gets the sampled
token from the last stage. A step goes through every stage on one driver thread per run,
so the event loop is woken once per token, not once per stage. The steps (prefill chunks,
a failover's replay one token per step, then decode) are the generation loop's, shared
with the replica engine (mesh.generation), so both produce the same tokens. Every stage's slot is freed
when the run ends, however it ends: closing the links makes each stage release the session.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import numpy.typing as npt

from mesh.errors import PeerError
from mesh.generation import generate_tokens
from mesh.sampling import Sampled
from mesh.types import PipelineJob, StageOutput, StageStep, TokenEvent

log = logging.getLogger(__name__)


class StageLink(Protocol):
    """One run's way into one stage: the head's own layers, a step socket or a Forward stream."""

    address: str

    def step(self, step: StageStep) -> StageOutput:
        """Blocking, on the run's driver thread."""

    def interrupt(self) -> None:
        """From any thread: end a step in progress soon (the run is being abandoned)."""

    def close(self) -> None:
        """On the driver thread after the last step: the stage frees the sessions opened on it."""


class PipelineRun:
    """`links[i]` reaches `job.stages[i]`; the run owns the links and closes them when it ends.
    It is the generation loop's Stepper (mesh.generation): a step goes through every stage,
    and the last stage samples the token after it."""

    def __init__(self, job: PipelineJob, links: Sequence[StageLink], count_sent: Callable[[int], None]) -> None:
        if len(links) != len(job.stages):
            raise ValueError("one link per stage")
        self._job = job
        self._links = links
        self._count_sent = count_sent  # hidden-state bytes handed from one stage to the next
        self._step = 0
        # fresh per attempt: a replay never collides with the sessions of the attempt it replaces
        self._session_id = f"{job.request.request_id}-{uuid.uuid4().hex[:8]}"
        self._out = StageOutput(step=-1)

    async def generate(self) -> AsyncGenerator[TokenEvent, None]:
        stop = threading.Event()
        tokens = generate_tokens(self._job.request, self._job.n_ctx, self, stop.is_set)
        # A thread of the run's own, not the loop's shared pool: a step may block for its whole
        # deadline, and other runs must not queue behind it. The whole loop runs there, so the
        # event loop is woken once per token, not once per step or stage.
        driver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        loop = asyncio.get_running_loop()
        try:
            while (event := await loop.run_in_executor(driver, next, tokens, None)) is not None:
                yield event
        finally:
            stop.set()
            for link in self._links:
                link.interrupt()  # a no-op after the last step; cuts a step still running when abandoned
            # Both on the driver, after whatever step it is still in, so no release overtakes a step.
            driver.submit(tokens.close)
            driver.submit(self._close_links)
            driver.shutdown(wait=False)

    def _close_links(self) -> None:
        for link in self._links:
            try:
                link.close()
            except Exception:
                log.exception("closing the link to %s failed", link.address)

    def choose(self, history: Sequence[int]) -> Sampled:
        out = self._out
        assert out.token_id is not None  # feed() refuses a last stage that sent none
        return Sampled(token_id=out.token_id, logprob=out.logprob, top=out.top_logprobs)

    def feed(self, tokens: Sequence[int], start: int, history: Sequence[int], generated: bool) -> None:
        """One step through every stage, on the driver thread; keeps the last stage's sampled token.
        `generated`: the step's tokens were generated (or replayed), not prompt: a constrained last
        stage advances its grammar over them."""
        request = self._job.request
        self._step += 1
        constrained = request.constraint is not None
        first = self._step == 1
        sampling = request.sampling
        # The penalty window is all the last stage needs of the history, and only if a penalty is on.
        window = sampling.repeat_last_n if sampling.penalised else 0
        recent = tuple(history[-window:]) if window > 0 else ()
        hidden: npt.NDArray[np.float32] | None = None
        out = StageOutput(step=self._step)
        last = len(self._links) - 1
        for index, link in enumerate(self._links):
            stage = self._job.stages[index]
            step = StageStep(
                session_id=self._session_id, model_sha256=request.model_sha256, layers=stage.layers,
                start_position=start, tokens=tuple(tokens) if index == 0 else None, hidden=hidden,
                sampling=sampling, logprobs=request.logprobs,
                step=self._step, history=recent if index == last else (),
                top_logprobs=request.top_logprobs if index == last else 0,
                constraint=request.constraint if index == last and first else None,
                generated=tuple(tokens) if index == last and constrained and generated else ())
            try:
                out = link.step(step)
            except PeerError as exc:
                exc.node_id = stage.node_id  # so the scheduler replaces this stage's node, not the whole chain
                raise
            if index < last:
                if out.hidden is None or out.hidden.shape[0] != len(tokens):
                    raise PeerError(f"stage {index} on {link.address} returned no hidden states for "
                                    f"{len(tokens)} tokens", retryable=False, node_id=stage.node_id)
                hidden = out.hidden
                self._count_sent(hidden.nbytes)
        if out.token_id is None:
            raise PeerError(f"the last stage on {self._links[last].address} returned no token", retryable=False,
                            node_id=self._job.stages[last].node_id)
        self._out = out
