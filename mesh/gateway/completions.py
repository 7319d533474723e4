"""The completion flow: request body -> prompt tokens -> scheduler session -> JSON or SSE.

Chat and text completions differ only in how the prompt is built and how a chunk of
text is wrapped; everything else (limits, stop strings, usage, finish reasons, metrics)
is shared here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from starlette.responses import JSONResponse, Response, StreamingResponse

from mesh.errors import CapacityExhausted, EdgeMeshError, InvalidInput, PayloadTooLarge, RequestTimeout, Unavailable
from mesh.gateway import logprobs, tool_calls
from mesh.gateway.answers import CLOUD_ROUTE, MESH_ROUTE, Answer, CloudAnswer, MeshAnswer
from mesh.gateway.flavors import CHAT, TEXT, Flavor
from mesh.gateway.logprobs import LogprobReport
from mesh.gateway.policy import ContentPolicyViolation, GatewayPolicy, SystemPromptEnforced
from mesh.gateway.schemas import ChatRequest, CompletionRequest, _Common
from mesh.metrics import GatewayMetrics
from mesh.scheduler import Scheduler, check_model, check_prompt
from mesh.tokenizer import Tokenizer
from mesh.types import GenerationRequest, RequestId

if TYPE_CHECKING:
    from mesh.cloud import CloudUpstream

log = logging.getLogger(__name__)

ROUTE_HEADER = "X-EdgeMesh-Route"


def error_body(error: EdgeMeshError) -> dict[str, Any]:
    # An error may name its OpenAI code (content_policy); else the code is the HTTP status.
    code = getattr(error, "openai_code", None) or error.http_status
    return {"error": {"message": str(error), "type": error.kind, "param": None, "code": code}}


def error_response(error: EdgeMeshError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.http_status in (429, 503) else None
    return JSONResponse(error_body(error), status_code=error.http_status, headers=headers)


def rejection_reason(error: EdgeMeshError) -> str | None:
    """The `reason` label of edgemesh_rejected_total for a request refused with `error`
    (None: not a refusal before work, such as a node failing mid-way)."""
    if isinstance(error, ContentPolicyViolation):
        return "content_policy"
    if isinstance(error, SystemPromptEnforced):
        return "system_prompt"
    if isinstance(error, PayloadTooLarge):
        return "too_large"
    if isinstance(error, RequestTimeout):
        return "timeout"
    if isinstance(error, InvalidInput):
        return "invalid"
    if isinstance(error, CapacityExhausted):
        return "capacity"
    if isinstance(error, Unavailable):
        return "unavailable"
    return None


def counted_error(metrics: GatewayMetrics, error: EdgeMeshError) -> JSONResponse:
    """The error answer to a mesh request that failed before its answer began, counted in the metrics."""
    metrics.requests.labels(MESH_ROUTE, str(error.http_status)).inc()
    reason = rejection_reason(error)
    if reason is not None:
        metrics.rejected.labels(reason).inc()
    return error_response(error)


@dataclass(frozen=True)
class Renderer:
    """Another API's shape of the same answer (Ollama's NDJSON: mesh.gateway.ollama)."""

    media_type: str
    lines: Callable[[Answer], AsyncIterator[str]]  # a streamed answer, line by line
    error_line: Callable[[EdgeMeshError], str]  # a failure after the headers, told in-band
    whole: Callable[[Answer, str], dict[str, Any]]  # a non-streamed answer, given its text


POLICIES = ("local-only", "cloud-first", "local-first")

# Threads that render chat templates and tokenize prompts. Tokenizing runs in llama.cpp
# without the GIL, so a second thread uses a second core; more would only queue on the same
# cores, and a bounded pool keeps a flood of long prompts from starting a thread each.
PROMPT_THREADS = 2


class Completions:
    """Chooses where an answer comes from (the routing policy), then shapes it as JSON or SSE.

    local-only: the mesh. cloud-first: the cloud unless its circuit breaker is open or it
    fails before its first token, then the mesh. local-first: the mesh unless it has no
    capacity, then the cloud. A cloud answer that breaks mid-way is completed by the mesh."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, model_name: str,
                 metrics: GatewayMetrics, cloud: CloudUpstream | None = None, policy: str = "local-only",
                 admin: GatewayPolicy | None = None, aliases: frozenset[str] = frozenset()) -> None:
        if policy not in POLICIES:
            raise InvalidInput(f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}")
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._aliases = aliases  # --model-alias: other names a client may ask for the model by
        self._metrics = metrics
        self._cloud = cloud
        self._admin = admin or GatewayPolicy()  # the admin's system prompt and deny patterns
        self.policy = policy if cloud is not None else "local-only"
        self.last_route = ""
        self._prompt_pool = ThreadPoolExecutor(PROMPT_THREADS, thread_name_prefix="edgemesh-prompt")

    def close(self) -> None:
        self._prompt_pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, body: _Common, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt and continuation tokens; CPU work (a template render and a tokenizer pass over
        up to a few megabytes), so it runs on the prompt pool, never on the event loop."""
        if isinstance(body, ChatRequest):
            template = self._tokenizer.chat_template.source if self._tokenizer.chat_template else ""
            messages = tool_calls.template_messages(body, template)
            prompt = self._tokenizer.encode_chat(self._admin.chat_messages(messages))
        else:
            assert isinstance(body, CompletionRequest)
            prompt = self._tokenizer.encode_completion(body.prompt_text())
        return prompt, self._tokenizer.encode_continuation(continuation)

    async def _prompt_tokens(self, body: _Common, continuation: str = "") -> tuple[list[int], list[int]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prompt_pool, self._encode, body, continuation)

    async def _generation_request(self, body: _Common, continuation: str = "") -> GenerationRequest:
        check_model(body.model, self._model_name, self._aliases)
        constraint = None
        if isinstance(body, ChatRequest) and tool_calls.constrained(body):
            # Compiling a large schema takes a tenth of a second or more: not on the event loop.
            constraint = await asyncio.get_running_loop().run_in_executor(self._prompt_pool, tool_calls.constraint_of,
                                                                          body)
        n_ctx = await self._scheduler.serving_context_length()
        if n_ctx is None:
            raise Unavailable("no node serving this model is ready; start one with `edgemesh node`")
        prompt, sent = await self._prompt_tokens(body, continuation)
        check_prompt(len(prompt) + len(sent), n_ctx)
        room = n_ctx - len(prompt) - len(sent)
        limit = body.token_limit()
        if limit is not None:
            limit = max(1, limit - len(sent))
        sampling = body.sampling()
        bad = [token for token, _ in sampling.logit_bias if token >= self._tokenizer.n_vocab]
        if bad:
            raise InvalidInput(f"logit_bias: token id {bad[0]} is outside the model's vocabulary of "
                               f"{self._tokenizer.n_vocab}")
        want_logprobs, top_logprobs = body.logprob_request()
        return GenerationRequest(
            request_id=RequestId(uuid.uuid4().hex), prompt_tokens=tuple(prompt + sent), sampling=sampling,
            max_tokens=min(limit, room) if limit else room,
            stop_token_ids=self._tokenizer.eog_ids, logprobs=want_logprobs, top_logprobs=top_logprobs,
            constraint=constraint,
        )

    async def _mesh_answer(self, body: _Common, started: float, continuation: str = "") -> MeshAnswer:
        request = await self._generation_request(body, continuation)
        self._metrics.queue_depth.inc()
        try:
            session = await self._scheduler.open(request)
        finally:
            self._metrics.queue_depth.dec()
        report = None
        if request.logprobs:
            # Legacy completions count text_offset from the start of the prompt, as OpenAI does.
            base = len(body.prompt_text()) + len(continuation) if isinstance(body, CompletionRequest) else 0
            report = LogprobReport(self._tokenizer, _kind(body), base)
        return MeshAnswer(session, self._tokenizer, body.stop_strings(), self._metrics, started, report)

    async def _cloud_answer(self, body: _Common, flavor: Flavor, started: float) -> CloudAnswer:
        """Open the cloud stream up to its first delta; raises CloudError if it cannot."""
        assert self._cloud is not None
        kind: Literal["chat", "text"] = "chat" if flavor is CHAT else "text"
        upstream_body = body.model_dump(exclude_none=True, exclude=_NOT_OPENAI)
        if isinstance(body, ChatRequest):
            upstream_body["messages"] = self._admin.cloud_messages(upstream_body["messages"])
        stream = self._cloud.stream(kind, upstream_body)
        try:
            first = await stream.__anext__()
            # Counted for `usage`; a template the mesh refuses is refused here too (the cloud
            # would have rendered its own), and the open stream is closed on the way out.
            prompt_tokens = len((await self._prompt_tokens(body))[0])
        except StopAsyncIteration:
            await stream.aclose()
            raise Unavailable("the cloud ended its answer before any text") from None
        except BaseException:
            await stream.aclose()
            raise
        return CloudAnswer(stream, first, uuid.uuid4().hex, self._metrics,
                           lambda text: self._mesh_answer(body, started, text),
                           lambda text: len(self._tokenizer.encode_continuation(text)), prompt_tokens, started)

    async def _answer(self, body: _Common, flavor: Flavor, started: float) -> Answer:
        cloud = self._cloud
        # A constraint is enforced where the mesh samples; a cloud's own would come back in its shape.
        if cloud is None or tool_calls.constrained(body):
            return await self._mesh_answer(body, started)
        from mesh.cloud import CloudError

        if self.policy == "cloud-first":
            if cloud.breaker.allow():
                try:
                    return await self._cloud_answer(body, flavor, started)
                except CloudError as exc:
                    log.warning("cloud failed before its first token (%s); answering from the mesh", exc.reason)
                    self._metrics.failover(CLOUD_ROUTE, MESH_ROUTE, "cloud_" + exc.reason, "before the first token")
            return await self._mesh_answer(body, started)
        try:
            return await self._mesh_answer(body, started)
        except (CapacityExhausted, Unavailable) as exc:
            if self.policy != "local-first" or not cloud.breaker.allow():
                raise
            log.info("the mesh cannot take this request (%s); asking the cloud", exc)
            self._metrics.failover(MESH_ROUTE, CLOUD_ROUTE, "no_capacity")
            try:
                return await self._cloud_answer(body, flavor, started)
            except CloudError:
                raise exc from None

    async def handle(self, body: _Common, flavor: Flavor, key_name: str = "",
                     render: Renderer | None = None) -> Response:
        """The answer to `body`, shaped as OpenAI's (or, given `render`, as another API's)."""
        started = time.monotonic()
        self._metrics.in_flight.inc()
        handed_to_stream = False
        try:
            check_model(body.model, self._model_name, self._aliases)
            answer, flavor = tool_calls.shape(body, self._admin.filter(await self._answer(body, flavor, started)),
                                              flavor)
            self._metrics.time_to_first_token.labels(answer.route).observe(time.monotonic() - started)
            self.last_route = answer.route
            headers = {ROUTE_HEADER: answer.header}
            if body.stream:
                handed_to_stream = True
                if render is not None:
                    return StreamingResponse(self._guarded(render.lines(answer), answer, key_name, render.error_line),
                                             headers=headers, media_type=render.media_type)
                return StreamingResponse(self._sse(body, flavor, answer, key_name), headers=headers,
                                         media_type="text/event-stream")
            if render is not None:
                return JSONResponse(render.whole(answer, await self._text(answer, key_name)), headers=headers)
            return JSONResponse(await self._collect(body, flavor, answer, key_name), headers=headers)
        except EdgeMeshError as exc:
            return counted_error(self._metrics, exc)
        except Exception as exc:  # a bug: still an OpenAI-shaped answer, and the gateway goes on
            log.exception("request failed unexpectedly")
            self._metrics.requests.labels(MESH_ROUTE, "500").inc()
            return error_response(EdgeMeshError(f"internal error: {exc}"))
        finally:
            if not handed_to_stream:
                self._metrics.in_flight.dec()

    def _envelope(self, request_id: str, flavor: Flavor, object_name: str) -> dict[str, Any]:
        return {"id": f"{'chatcmpl' if flavor is CHAT else 'cmpl'}-{request_id}", "object": object_name,
                "created": int(time.time()), "model": self._model_name}

    def _count_key_tokens(self, key_name: str, answer: Answer) -> None:
        if key_name:
            usage = answer.usage()
            for kind in ("prompt", "completion"):
                self._metrics.tokens_by_key.labels(key_name, kind).inc(usage.get(f"{kind}_tokens", 0))

    async def _text(self, answer: Answer, key_name: str = "", shown: list[dict[str, Any]] | None = None) -> str:
        """The whole text of a non-streamed answer, counted in the metrics; with `shown`, the
        logprobs that came with each piece are gathered into it."""
        pieces: list[str] = []
        async for delta in answer.deltas():
            pieces.append(delta)
            if shown is not None:
                _take(answer, shown)
        if shown is not None:
            _take(answer, shown)
        self._metrics.requests.labels(answer.route, "200").inc()
        self._count_key_tokens(key_name, answer)
        return "".join(pieces)

    async def _collect(self, body: _Common, flavor: Flavor, answer: Answer, key_name: str = "") -> dict[str, Any]:
        want_logprobs = body.logprob_request()[0]
        shown: list[dict[str, Any]] = []  # logprobs, in the pieces of the chunks they came with
        text = await self._text(answer, key_name, shown if want_logprobs else None)
        result = self._envelope(answer.request_id, flavor, flavor.object_name)
        choice = {"index": 0, **flavor.wrap_text(text), "finish_reason": answer.finish_reason}
        if want_logprobs:
            kind = _kind(body)
            choice["logprobs"] = logprobs.merge(kind, shown) or logprobs.empty(kind)
        return {**result, "choices": [choice], "usage": answer.usage()}

    async def _guarded(self, lines: AsyncIterator[str], answer: Answer, key_name: str,
                       error_line: Callable[[EdgeMeshError], str]) -> AsyncIterator[str]:
        """A streamed body (SSE or another API's lines) with its metrics, and a failure told in-band."""
        status = "200"
        try:
            async with contextlib.aclosing(lines):  # type: ignore[type-var]
                async for line in lines:
                    yield line
        except EdgeMeshError as exc:
            # Headers are gone already: tell the client in-band, then end the stream cleanly.
            status = str(exc.http_status)
            log.warning("stream %s failed: %s", answer.request_id, exc)
            yield error_line(exc)
        except Exception as exc:  # a bug must still end the client's stream cleanly, and be logged
            status = "500"
            log.exception("stream %s failed unexpectedly", answer.request_id)
            yield error_line(EdgeMeshError(f"internal error: {exc}"))
        finally:
            self._metrics.requests.labels(answer.route, status).inc()
            self._metrics.in_flight.dec()
            self._count_key_tokens(key_name, answer)

    async def _sse(self, body: _Common, flavor: Flavor, answer: Answer, key_name: str = "") -> AsyncIterator[str]:
        envelope = self._envelope(answer.request_id, flavor, flavor.chunk_object)

        def chunk(choice: dict[str, Any], **extra: Any) -> str:
            return "data: " + json.dumps({**envelope, "choices": [choice] if choice else [], **extra}) + "\n\n"

        async def lines() -> AsyncIterator[str]:
            if flavor.first_delta is not None:
                yield chunk({"index": 0, **flavor.first_delta, "finish_reason": None})
            want_logprobs = body.logprob_request()[0]
            async for delta in answer.deltas():
                choice = {"index": 0, **flavor.wrap_delta(delta), "finish_reason": None}
                if want_logprobs:
                    choice["logprobs"] = answer.take_logprobs()
                yield chunk(choice)
            final = flavor.wrap_delta("") if flavor is TEXT else {"delta": {}}
            choice = {"index": 0, **final, "finish_reason": answer.finish_reason}
            if want_logprobs:  # tokens whose text came with no delta of its own (an empty piece)
                choice["logprobs"] = answer.take_logprobs()
            yield chunk(choice)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk({}, usage=answer.usage())

        async for line in self._guarded(lines(), answer, key_name,
                                        lambda exc: "data: " + json.dumps(error_body(exc)) + "\n\n"):
            yield line
        yield "data: [DONE]\n\n"


def _kind(body: _Common) -> logprobs.Kind:
    return "chat" if isinstance(body, ChatRequest) else "text"


def _take(answer: Answer, into: list[dict[str, Any]]) -> None:
    part = answer.take_logprobs()
    if part is not None:
        into.append(part)


# Our sampling extensions: an OpenAI-compatible cloud may refuse unknown fields.
# The client's model name goes up as it is unless --cloud-model replaces it.
_NOT_OPENAI = {"stream", "stream_options", "top_k", "min_p", "repeat_penalty", "repeat_last_n"}
