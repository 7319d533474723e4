"""The completion flow: request body -> prompt tokens -> scheduler session -> JSON or SSE.

Chat and text completions differ only in how the prompt is built and how a chunk of
text is wrapped; everything else (limits, stop strings, usage, finish reasons, metrics)
is shared here.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from mesh.errors import EdgeMeshError, InvalidInput
from mesh.gateway.schemas import ChatRequest, CompletionRequest, _Common
from mesh.metrics import GatewayMetrics
from mesh.scheduler import Scheduler, Session, check_model, check_prompt
from mesh.tokenizer import TextStream, Tokenizer
from mesh.types import GenerationRequest, RequestId

log = logging.getLogger(__name__)

ROUTE_HEADER = "X-EdgeMesh-Route"
MESH_ROUTE = "mesh"


def error_body(error: EdgeMeshError) -> dict[str, Any]:
    return {"error": {"message": str(error), "type": error.kind, "param": None, "code": error.http_status}}


def error_response(error: EdgeMeshError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.http_status in (429, 503) else None
    return JSONResponse(error_body(error), status_code=error.http_status, headers=headers)


@dataclass(frozen=True)
class Flavor:
    """What distinguishes chat from text completions."""

    object_name: str
    chunk_object: str
    wrap_text: Callable[[str], dict[str, Any]]  # a full answer's choice body
    wrap_delta: Callable[[str], dict[str, Any]]  # a streamed chunk's choice body
    first_delta: dict[str, Any] | None  # chat announces the role first


CHAT = Flavor("chat.completion", "chat.completion.chunk",
              lambda text: {"message": {"role": "assistant", "content": text}},
              lambda text: {"delta": {"content": text}},
              {"delta": {"role": "assistant", "content": ""}})
TEXT = Flavor("text_completion", "text_completion",
              lambda text: {"text": text, "logprobs": None},
              lambda text: {"text": text, "logprobs": None},
              None)


class Completions:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, model_name: str,
                 metrics: GatewayMetrics) -> None:
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._metrics = metrics

    def _prompt_tokens(self, body: _Common) -> list[int]:
        if isinstance(body, ChatRequest):
            return self._tokenizer.encode_chat(body.template_messages())
        assert isinstance(body, CompletionRequest)
        return self._tokenizer.encode_completion(body.prompt_text())

    def _generation_request(self, body: _Common) -> GenerationRequest:
        check_model(body.model, self._model_name)
        n_ctx = self._scheduler.context_length()
        if n_ctx is None:
            from mesh.errors import Unavailable

            raise Unavailable("no node serving this model is ready; start one with `edgemesh node`")
        prompt = self._prompt_tokens(body)
        check_prompt(len(prompt), n_ctx)
        room = n_ctx - len(prompt)
        limit = body.token_limit()
        return GenerationRequest(
            request_id=RequestId(uuid.uuid4().hex), prompt_tokens=tuple(prompt), sampling=body.sampling(),
            max_tokens=min(limit, room) if limit else room,
            stop_token_ids=self._tokenizer.eog_ids, logprobs=body.wants_logprobs(),
        )

    async def handle(self, body: _Common, flavor: Flavor) -> Response:
        started = time.monotonic()
        self._metrics.in_flight.inc()
        handed_to_stream = False
        try:
            request = self._generation_request(body)
            self._metrics.queue_depth.inc()
            try:
                session = await self._scheduler.open(request)
            finally:
                self._metrics.queue_depth.dec()
            self._metrics.time_to_first_token.labels(MESH_ROUTE).observe(time.monotonic() - started)
            headers = {ROUTE_HEADER: session.route.header()}
            if body.stream:
                handed_to_stream = True
                return StreamingResponse(self._sse(body, flavor, session, started), headers=headers,
                                         media_type="text/event-stream")
            return JSONResponse(await self._collect(body, flavor, session, started), headers=headers)
        except EdgeMeshError as exc:
            self._metrics.requests.labels(MESH_ROUTE, str(exc.http_status)).inc()
            if isinstance(exc, InvalidInput):
                self._metrics.rejected.labels("invalid").inc()
            return error_response(exc)
        finally:
            if not handed_to_stream:
                self._metrics.in_flight.dec()

    def _envelope(self, request_id: str, flavor: Flavor, object_name: str) -> dict[str, Any]:
        return {"id": f"{'chatcmpl' if flavor is CHAT else 'cmpl'}-{request_id}", "object": object_name,
                "created": int(time.time()), "model": self._model_name}

    @staticmethod
    def _usage(session: Session) -> dict[str, int]:
        completion = len(session.generated)
        if session.finish_reason == "stop" and session.generated and \
                session.generated[-1] in session.request.stop_token_ids:
            completion -= 1  # the end-of-generation token is not part of the answer
        prompt = len(session.request.prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _text_deltas(self, body: _Common, session: Session, started: float) -> AsyncIterator[str]:
        """Text pieces of the answer; sets session.finish_reason to what the client should see."""
        text = TextStream(self._tokenizer, body.stop_strings())
        last = time.monotonic()
        produced = 0
        async for event in session.events():
            now = time.monotonic()
            if produced:
                self._metrics.inter_token.labels(MESH_ROUTE).observe(now - last)
            last = now
            produced += 1
            if event.token_id in session.request.stop_token_ids:
                break
            delta = text.push(event.token_id)
            if delta:
                yield delta
            if text.stopped:
                session.finish_reason = "stop"
                break
        tail = text.finish()
        if tail:
            yield tail
        self._metrics.tokens.labels(MESH_ROUTE).inc(produced)
        self._metrics.prompt_tokens.labels(MESH_ROUTE).inc(len(session.request.prompt_tokens))
        self._metrics.duration.labels(MESH_ROUTE).observe(time.monotonic() - started)

    async def _collect(self, body: _Common, flavor: Flavor, session: Session, started: float) -> dict[str, Any]:
        pieces = [delta async for delta in self._text_deltas(body, session, started)]
        self._metrics.requests.labels(MESH_ROUTE, "200").inc()
        result = self._envelope(session.request.request_id, flavor, flavor.object_name)
        choice = {"index": 0, **flavor.wrap_text("".join(pieces)), "finish_reason": session.finish_reason}
        return {**result, "choices": [choice], "usage": self._usage(session)}

    async def _sse(self, body: _Common, flavor: Flavor, session: Session, started: float) -> AsyncIterator[str]:
        envelope = self._envelope(session.request.request_id, flavor, flavor.chunk_object)

        def chunk(choice: dict[str, Any], **extra: Any) -> str:
            return "data: " + json.dumps({**envelope, "choices": [choice] if choice else [], **extra}) + "\n\n"

        status = "200"
        try:
            if flavor.first_delta is not None:
                yield chunk({"index": 0, **flavor.first_delta, "finish_reason": None})
            async for delta in self._text_deltas(body, session, started):
                yield chunk({"index": 0, **flavor.wrap_delta(delta), "finish_reason": None})
            final = flavor.wrap_delta("") if flavor is TEXT else {"delta": {}}
            yield chunk({"index": 0, **final, "finish_reason": session.finish_reason})
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk({}, usage=self._usage(session))
        except EdgeMeshError as exc:
            # Headers are gone already: tell the client in-band, then end the stream cleanly.
            status = str(exc.http_status)
            log.warning("stream %s failed: %s", session.request.request_id, exc)
            yield "data: " + json.dumps(error_body(exc)) + "\n\n"
        except Exception as exc:  # a bug must still end the client's stream cleanly, and be logged
            status = "500"
            log.exception("stream %s failed unexpectedly", session.request.request_id)
            yield "data: " + json.dumps(error_body(EdgeMeshError(f"internal error: {exc}"))) + "\n\n"
        finally:
            self._metrics.requests.labels(MESH_ROUTE, status).inc()
            self._metrics.in_flight.dec()
        yield "data: [DONE]\n\n"
