"""Where an answer's text comes from: the mesh (a scheduler session) or the cloud upstream
(which, if it dies mid-answer, the mesh completes). The HTTP layer (completions.py) only
sees `Answer`: text deltas, a finish reason, usage and the route header.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from mesh.errors import EdgeMeshError
from mesh.gateway.logprobs import LogprobReport
from mesh.metrics import GatewayMetrics
from mesh.scheduler import Session
from mesh.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)

MESH_ROUTE = "mesh"
CLOUD_ROUTE = "cloud"


class Answer:
    """Text deltas of one answer. `finish_reason` and `usage()` are final once `deltas()` ends."""

    route = MESH_ROUTE
    request_id = ""
    header = ""
    finish_reason: str | None = None

    def deltas(self) -> AsyncIterator[str]:
        raise NotImplementedError

    def usage(self) -> dict[str, int]:
        raise NotImplementedError

    def take_logprobs(self) -> dict[str, Any] | None:
        """OpenAI-shaped logprobs of the tokens behind the text yielded since the last call
        (None: none, or not asked for); called after each delta and once deltas() ended."""
        return None


class MeshAnswer(Answer):
    def __init__(self, session: Session, tokenizer: Tokenizer, stop: list[str], metrics: GatewayMetrics,
                 started: float, logprobs: LogprobReport | None = None) -> None:
        self._session = session
        self._logprobs = logprobs
        self._tokenizer = tokenizer
        self._stop = stop
        self._metrics = metrics
        self._started = started
        self.request_id = session.request.request_id
        self.header = session.route.header()

    async def deltas(self) -> AsyncIterator[str]:
        session = self._session
        text = TextStream(self._tokenizer, self._stop)
        last = time.monotonic()
        produced = 0
        events = session.events()
        async with contextlib.aclosing(events):  # a stop string ends the loop early: free the node now
            async for event in events:
                now = time.monotonic()
                if produced:
                    self._metrics.inter_token.labels(MESH_ROUTE).observe(now - last)
                last = now
                produced += 1
                if event.token_id in session.request.stop_token_ids:
                    break
                if self._logprobs is not None:
                    self._logprobs.add(event, text.decoded_chars)
                delta = text.push(event.token_id)
                if self._logprobs is not None:
                    self._logprobs.release(len(text.text))
                if delta:
                    yield delta
                if text.stopped:
                    session.finish_reason = "stop"
                    break
        tail = text.finish()
        if self._logprobs is not None:
            self._logprobs.finish(len(text.text) if text.stopped else None)
        if tail:
            yield tail
        self.finish_reason = session.finish_reason
        self._metrics.tokens.labels(MESH_ROUTE).inc(produced)
        self._metrics.prompt_tokens.labels(MESH_ROUTE).inc(len(session.request.prompt_tokens))
        self._metrics.duration.labels(MESH_ROUTE).observe(time.monotonic() - self._started)

    def usage(self) -> dict[str, int]:
        session = self._session
        completion = len(session.generated)
        if session.finish_reason == "stop" and session.generated and \
                session.generated[-1] in session.request.stop_token_ids:
            completion -= 1  # the end-of-generation token is not part of the answer
        prompt = len(session.request.prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def take_logprobs(self) -> dict[str, Any] | None:
        return None if self._logprobs is None else self._logprobs.take()


Continuation = Callable[[str], Awaitable[MeshAnswer]]


class CloudAnswer(Answer):
    """A cloud stream, opened far enough to have its first delta (so a dead cloud can still be
    replaced by the mesh before any header is sent). If it breaks later, `continue_on_mesh`
    gets the text already sent and returns a mesh answer that carries on from there."""

    route = CLOUD_ROUTE
    header = CLOUD_ROUTE

    def __init__(self, stream: AsyncIterator[Any], first: Any, request_id: str, metrics: GatewayMetrics,
                 continue_on_mesh: Continuation, count_tokens: Callable[[str], int], prompt_tokens: int,
                 started: float) -> None:
        self._stream = stream
        self._first = first
        self.request_id = request_id
        self._metrics = metrics
        self._continue = continue_on_mesh
        self._count = count_tokens
        self._prompt_tokens = prompt_tokens
        self._started = started
        self._sent: list[str] = []
        self._mesh: MeshAnswer | None = None
        self._cloud_usage: dict[str, int] | None = None
        self._cloud_logprobs: dict[str, Any] | None = None  # the cloud's own, passed on unchanged

    async def deltas(self) -> AsyncIterator[str]:
        from mesh.cloud import CloudError

        last = time.monotonic()
        try:
            delta = self._first
            while True:
                if delta.logprobs is not None:
                    self._cloud_logprobs = delta.logprobs
                if delta.text:
                    self._sent.append(delta.text)
                    yield delta.text
                    now = time.monotonic()
                    self._metrics.inter_token.labels(CLOUD_ROUTE).observe(now - last)
                    last = now
                if getattr(delta, "usage", None):
                    self._cloud_usage = dict(delta.usage)
                if delta.finish_reason:
                    self.finish_reason = delta.finish_reason
                try:
                    delta = await self._stream.__anext__()
                except StopAsyncIteration:
                    break
        except CloudError as exc:
            text = "".join(self._sent)
            log.warning("cloud stream %s broke after %d characters (%s); the mesh continues it",
                        self.request_id, len(text), exc.reason)
            self._metrics.failover(CLOUD_ROUTE, MESH_ROUTE, "cloud_" + exc.reason, "mid-answer")
            try:
                self._mesh = await self._continue(text)
            except EdgeMeshError as mesh_exc:
                raise EdgeMeshError(f"the cloud failed mid-answer ({exc.reason}) and the mesh could not "
                                    f"continue: {mesh_exc}") from mesh_exc
            async for piece in self._mesh.deltas():
                yield piece
            self.finish_reason = self._mesh.finish_reason
        finally:
            # The client may leave mid-answer: end the cloud request now, not at garbage collection,
            # so its connection and the breaker's probe slot are freed.
            await self._stream.aclose()  # type: ignore[attr-defined]
        self._metrics.tokens.labels(CLOUD_ROUTE).inc(self._count("".join(self._sent)))
        self._metrics.duration.labels(CLOUD_ROUTE).observe(time.monotonic() - self._started)
        if self.finish_reason is None:
            self.finish_reason = "stop"

    def take_logprobs(self) -> dict[str, Any] | None:
        if self._mesh is not None:
            return self._mesh.take_logprobs()
        taken, self._cloud_logprobs = self._cloud_logprobs, None
        return taken

    def usage(self) -> dict[str, int]:
        if self._mesh is None and self._cloud_usage is not None:
            return self._cloud_usage
        completion = self._count("".join(self._sent))
        if self._mesh is not None:
            completion += self._mesh.usage()["completion_tokens"]
        return {"prompt_tokens": self._prompt_tokens, "completion_tokens": completion,
                "total_tokens": self._prompt_tokens + completion}
