"""Drive one session through the stages of a pipeline.

The head of a pipeline (the node of stage 0, see node.pipeline_head) runs this: it feeds its
own layers the token ids and hands their hidden states to the later stages, which return the
last stage's sampled token. The later stages are a ring (mesh.transport.ring: each stage
sends its output straight to the next, the last stage's token comes back to the head, N
one-way hops a token) or, where a ring cannot be had, a hub (HubStages: the head sends each
later stage its step and waits for its reply). A step goes through every stage on one driver
thread per run, so the event loop is woken once per token, not once per stage. The steps
(prefill chunks, a failover's replay one token per step, then decode) are the generation
loop's, shared with the replica engine (mesh.generation), so both produce the same tokens.
Every stage's slot is freed when the run ends, however it ends: closing the links makes each
stage release the session.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from mesh.errors import PeerError
from mesh.generation import generate_tokens
from mesh.sampling import Sampled
from mesh.transport import hidden_wire
from mesh.types import HiddenDType, PipelineJob, StageOutput, StageStep, TokenEvent

log = logging.getLogger(__name__)


class StageLink(Protocol):
    """One run's way into one stage: the head's own layers, a step socket or a Forward stream."""

    address: str
    rtt_s: float | None  # the link's round trip as its TCP connection measured it (None: unknown, or local)

    def step(self, step: StageStep, hidden_dtype: HiddenDType = "f32") -> StageOutput:
        """Blocking, on the run's driver thread; the step's hidden states travel in `hidden_dtype`."""

    def interrupt(self) -> None:
        """From any thread: end a step in progress soon (the run is being abandoned)."""

    def close(self) -> None:
        """On the driver thread after the last step: the stage frees the sessions opened on it."""


class LaterStages(Protocol):
    """Every stage after the head's, for one run: a ring (mesh.transport.ring) or a hub."""

    address: str

    def run(self, steps: Sequence[StageStep]) -> StageOutput:
        """One step through them all (steps[0] carries the head's hidden states), blocking, on the
        driver thread; the last stage's output. A PeerError names the node that failed. Each
        hidden-state send the head makes is counted (hidden_wire.CountSent)."""

    def send_ahead(self, steps: Sequence[StageStep]) -> bool:
        """Start a step whose output is not needed and return without waiting for it (True), or
        do nothing (False: the caller runs it). A step sent ahead is waited for, and checked, by
        the next `run`; its failure is raised there."""

    def interrupt(self) -> None:
        """From any thread: end a step in progress soon."""

    def close(self) -> None:
        """On the driver thread after the last step."""


class HubStages:
    """The head sends each later stage its step and waits for its reply: 2(N-1) one-way hops a
    token. Used where a ring is not to be had: one later stage (where the two are the same), or
    a later stage whose node has no step socket (its Forward stream answers each step back)."""

    def __init__(self, links: Sequence[StageLink], nodes: Sequence[str],
                 count_sent: hidden_wire.CountSent) -> None:
        if len(links) != len(nodes) or not links:
            raise ValueError("one link per later stage")
        self.address = links[0].address
        self._links = links
        self._nodes = nodes
        self._count_sent = count_sent

    def run(self, steps: Sequence[StageStep]) -> StageOutput:
        out = StageOutput(step=steps[0].step)
        hidden = steps[0].hidden
        last = len(self._links) - 1
        for index, link in enumerate(self._links):
            step = replace(steps[index], hidden=hidden)
            dtype = hidden_wire.send_dtype(step, link.rtt_s, self._count_sent)
            try:
                out = link.step(step, dtype)
            except PeerError as exc:
                exc.node_id = self._nodes[index]  # so the scheduler replaces this stage's node, not the whole chain
                raise
            if index < last:
                hidden = _checked_hidden(out, steps[index].n_tokens, link.address, self._nodes[index])
        return out

    def send_ahead(self, steps: Sequence[StageStep]) -> bool:
        return False  # each stage's step waits for the one before it: nothing to overlap

    def interrupt(self) -> None:
        for link in self._links:
            link.interrupt()

    def close(self) -> None:
        for link in self._links:
            try:
                link.close()
            except Exception:
                log.exception("closing the link to %s failed", link.address)


def _checked_hidden(out: StageOutput, n_tokens: int, address: str, node_id: str | None,
                    ) -> npt.NDArray[np.float32]:
    if out.hidden is None or out.hidden.shape[0] != n_tokens:
        raise PeerError(f"the stage on {address} returned no hidden states for {n_tokens} tokens",
                        retryable=False, node_id=node_id)
    return out.hidden


class PipelineRun:
    """`head` runs `job.stages[0]` (the head's own layers), `later` the rest (None: the head's
    layers are the whole model); the run owns both and
    closes them when it ends. It is the generation loop's Stepper (mesh.generation): a step
    goes through every stage, and the last stage samples the token after it."""

    def __init__(self, job: PipelineJob, head: StageLink, later: LaterStages | None) -> None:
        if (later is None) != (len(job.stages) == 1):
            raise ValueError("later stages exactly when the pipeline has more than one")
        self._job = job
        self._head = head
        self._later = later
        self._step = 0
        # fresh per attempt: a replay never collides with the sessions of the attempt it replaces
        self._session_id = f"{job.request.request_id}-{uuid.uuid4().hex[:8]}"
        self._out = StageOutput(step=-1)

    async def generate(self) -> AsyncGenerator[TokenEvent, None]:
        stop = threading.Event()
        tokens = generate_tokens(self._job.request, self._job.n_ctx, self, stop.is_set)
        # A thread of the run's own, not the loop's shared pool: a step may block for its whole
        # deadline, and other runs must not queue behind it. The whole loop runs there and goes
        # straight on to the next step after each token, handing the token to the event loop on
        # the way: the loop's turn to stream it is off the token's path (asking the driver for
        # each next token put two thread wake-ups on it).
        driver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | BaseException | None] = asyncio.Queue()

        def hand_over(item: TokenEvent | BaseException | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:
                pass  # the loop is gone: nobody is waiting for the run any more

        def drive() -> None:
            outcome: Exception | None = None  # None: the stream ended; else it ends with this, on the loop
            try:
                for event in tokens:
                    hand_over(event)
                    if stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - raised again on the loop, by the stream's reader
                outcome = exc
            finally:
                hand_over(outcome)

        driver.submit(drive)
        try:
            while (item := await events.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            for link in self._links():
                link.interrupt()  # a no-op after the last step; cuts a step still running when abandoned
            # Both on the driver, after whatever step it is still in, so no release overtakes a step.
            driver.submit(tokens.close)
            driver.submit(self._close_links)
            driver.shutdown(wait=False)

    def _links(self) -> list[StageLink | LaterStages]:
        return [self._head] if self._later is None else [self._head, self._later]

    def _close_links(self) -> None:
        for link in self._links():
            try:
                link.close()
            except Exception:
                log.exception("closing the link to %s failed", link.address)

    def choose(self, history: Sequence[int]) -> Sampled:
        out = self._out
        assert out.token_id is not None  # feed() refuses a last stage that sent none
        return Sampled(token_id=out.token_id, logprob=out.logprob, top=out.top_logprobs)

    def feed(self, tokens: Sequence[int], start: int, history: Sequence[int], generated: bool,
             ahead: bool = False) -> None:
        """One step through every stage, on the driver thread; keeps the last stage's sampled token.
        `generated`: the step's tokens were generated (or replayed), not prompt: a constrained last
        stage advances its grammar over them. `ahead`: its output is not needed, so a ring is only
        handed the step, and the head goes on to compute the next one while the ring works."""
        request = self._job.request
        self._step += 1
        constrained = request.constraint is not None
        first = self._step == 1
        sampling = request.sampling
        # The penalty window is all the last stage needs of the history, and only if a penalty is on.
        window = sampling.repeat_last_n if sampling.penalised else 0
        recent = tuple(history[-window:]) if window > 0 else ()
        last = len(self._job.stages) - 1
        steps = [StageStep(
            session_id=self._session_id, model_sha256=request.model_sha256, layers=stage.layers,
            start_position=start, tokens=tuple(tokens) if index == 0 else None, hidden=None,
            sampling=sampling, logprobs=request.logprobs, reply_dtype=self._job.activation_dtype,
            step=self._step, history=recent if index == last else (),
            top_logprobs=request.top_logprobs if index == last else 0,
            constraint=request.constraint if index == last and first else None,
            generated=tuple(tokens) if index == last and constrained and generated else ())
            for index, stage in enumerate(self._job.stages)]
        out = self._head.step(steps[0])
        if self._later is not None:
            hidden = _checked_hidden(out, len(tokens), self._head.address, self._job.stages[0].node_id)
            steps[1] = replace(steps[1], hidden=hidden)
            if ahead and self._later.send_ahead(steps[1:]):
                return
            out = self._later.run(steps[1:])
        if out.token_id is None:
            raise PeerError(f"the last stage of {self._job.stages[last].node_id} returned no token",
                            retryable=False, node_id=self._job.stages[last].node_id)
        self._out = out
