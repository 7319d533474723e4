"""Ollama's API (/api/tags, /api/version, /api/show, /api/ps, /api/chat, /api/generate,
/api/embed, /api/embeddings) over the same flow as /v1: a thin adapter, nothing more.

An Ollama request becomes the same internal request as its OpenAI twin (a ChatRequest or a
CompletionRequest), so limits, the admin's policy, API keys, routing and metrics are those
of /v1; the answer's text deltas are wrapped as Ollama's NDJSON lines (a Renderer for
mesh.gateway.completions). The same no-silent-ignore rule as mesh.gateway.schemas: every
option or field this adapter does not implement is refused with a 400 naming it.

`format` and `tools` become the ChatRequest's response_format and tools, so they are decoded
under the same grammar as /v1's (mesh.gateway.tool_calls); a call comes back in Ollama's shape,
`message.tool_calls` = [{"function": {"name", "arguments": {...}}}] with done_reason "stop".

Shapes follow Ollama's API documentation (docs/api.md of ollama/ollama): streamed lines
`{model, created_at, message|response, done: false}` and a last line with `done: true`,
`done_reason` and the durations in nanoseconds. Sampling defaults are EdgeMesh's (those of
/v1, so the two APIs answer alike), not Ollama's (which penalises repeats by 1.1).
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh import __version__
from mesh.errors import EdgeMeshError, InvalidInput
from mesh.gateway.answers import Answer
from mesh.gateway.completions import Renderer, error_response
from mesh.gateway.embeddings import EmbeddingRequest
from mesh.gateway.flavors import CHAT, TEXT
from mesh.gateway.schemas import ChatRequest, CompletionRequest, _Strict, parse
from mesh.gateway.tool_calls import ToolCallAnswer
from mesh.scheduler import check_model

if TYPE_CHECKING:
    from mesh.gateway.runtime import GatewayRuntime

# The Ollama API version answered by /api/version: the one whose documented shapes this
# adapter follows (clients compare it to decide what they may send).
OLLAMA_API_VERSION = "0.6.0"
TAG = ":latest"  # Ollama names carry a tag; a client may send the name with or without it
NDJSON = "application/x-ndjson"
# llama.cpp's llama_ftype (GGUF general.file_type) of the usual files, as Ollama names them.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 32: "BF16"}


def _unsupported(values: dict[str, Any], names: dict[str, str]) -> None:
    for name, what in names.items():
        value = values.get(name)
        if value not in (None, False, "", [], {}):
            raise ValueError(f"{name}: EdgeMesh does not support {what} on the Ollama API yet (leave it out)")


class Options(_Strict):
    """Ollama's `options`, those EdgeMesh implements; any other is refused by name."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=2**31)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-1, le=2**63 - 1)  # -1: a random one, as Ollama
    num_predict: int | None = Field(default=None, ge=-2)  # -1: no limit, -2: fill the context
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=2**31)  # -1: the whole history
    num_ctx: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _counts(self) -> Options:
        if self.num_predict == 0:
            raise ValueError("options.num_predict must be at least 1 (or -1 for no limit)")
        return self

    def fields(self) -> dict[str, Any]:
        """The internal request's fields these options set."""
        out: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.seed is not None and self.seed >= 0:
            out["seed"] = self.seed
        if self.num_predict is not None and self.num_predict > 0:
            out["max_tokens"] = self.num_predict
        if self.stop is not None:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.repeat_last_n is not None:
            out["repeat_last_n"] = 2**31 if self.repeat_last_n < 0 else self.repeat_last_n
        return out


class CalledFunction(_Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)  # an object, not JSON text as on /v1
    index: int | None = None  # newer Ollama versions number the calls of one answer


class OllamaToolCall(_Strict):
    id: str | None = None  # what some clients echo back; Ollama's own calls carry none
    type: Literal["function"] | None = None
    function: CalledFunction


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None  # an assistant's earlier calls
    tool_name: str | None = None  # which tool a `tool` message answers
    thinking: str | None = None  # an earlier turn's reasoning: templates leave it out, so does EdgeMesh

    @model_validator(mode="after")
    def _supported(self) -> Message:
        _unsupported({"images": self.images}, {"images": "images"})
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries them")
        if self.tool_name and self.role != "tool":
            raise ValueError("tool_name: only a tool message carries it")
        return self


_NOT_YET = {"think": "thinking", "template": "a template of the request's own (the model's own is used)"}


class _Request(_Strict):
    model: str
    stream: bool = True  # Ollama streams unless told not to
    options: Options | None = None
    keep_alive: str | int | float | None = None  # informational: the mesh keeps what its controller placed
    format: Any = None  # "json" or a JSON schema object: checked in response_format()
    think: Any = None
    template: Any = None

    @model_validator(mode="after")
    def _supported_fields(self) -> _Request:
        _unsupported({n: getattr(self, n) for n in _NOT_YET}, _NOT_YET)
        return self


class ChatBody(_Request):
    messages: list[Message] = Field(default_factory=list)
    system: str | None = None  # Open WebUI sends a model's system prompt here
    tools: list[Any] | None = None  # OpenAI's shape already: validated as the ChatRequest's tools

    @model_validator(mode="after")
    def _one_constraint(self) -> ChatBody:
        if self.tools and self.format not in (None, ""):
            raise ValueError("format: EdgeMesh cannot combine format with tools (send one of them)")
        return self


class GenerateBody(_Request):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None

    @model_validator(mode="after")
    def _supported(self) -> GenerateBody:
        _unsupported({"suffix": self.suffix, "images": self.images, "context": self.context},
                     {"suffix": "suffix (fill-in-the-middle)", "images": "images",
                      "context": "context (the deprecated token history; send messages to /api/chat)"})
        if self.raw and self.system:
            raise ValueError("system: a raw prompt takes no system prompt (it is sent as it is)")
        if self.raw and self.format not in (None, ""):
            raise ValueError("format: EdgeMesh cannot constrain a raw prompt's answer yet (leave out raw or format)")
        return self


class EmbedOptions(_Strict):
    num_ctx: int | None = Field(default=None, ge=1)


class EmbedBody(_Strict):
    model: str
    input: str | list[str]
    truncate: bool = True  # Ollama's default: an input longer than the context is cut to it
    dimensions: int | None = Field(default=None, ge=1)
    options: EmbedOptions | None = None
    keep_alive: str | int | float | None = None


class LegacyEmbedBody(_Strict):
    model: str
    prompt: str
    options: EmbedOptions | None = None
    keep_alive: str | int | float | None = None


class ShowBody(_Strict):
    model: str | None = None
    name: str | None = None  # the older spelling
    verbose: bool = False  # informational: there is no more to show


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _model_name(name: str) -> str:
    """The name as the OpenAI flow knows it: Ollama's default tag dropped."""
    return name[: -len(TAG)] if name.endswith(TAG) else name


class OllamaCall:
    """An Ollama chat or generate request, as the internal request the /v1 flow answers."""

    def __init__(self, kind: Literal["chat", "generate"], name: str, request: ChatRequest | CompletionRequest,
                 empty: bool) -> None:
        self.kind = kind
        self.name = name  # echoed in every answer line, as the client spelled it
        self.request = request
        self.empty = empty  # no messages / no prompt: Ollama's "load the model" call


def _check_num_ctx(options: Options | EmbedOptions | None, served: int | None) -> None:
    if options is not None and options.num_ctx is not None and served is not None and options.num_ctx > served:
        raise InvalidInput(f"options.num_ctx: {options.num_ctx} is above the context this mesh serves the model "
                           f"with ({served} tokens)")


def _internal(schema: type[ChatRequest] | type[CompletionRequest], fields: dict[str, Any]) -> Any:
    try:
        return schema.model_validate(fields)
    except ValidationError as exc:  # a value the /v1 schema refuses (the same limits)
        raise InvalidInput("; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                                     for e in exc.errors()[:5])) from None


def response_format(value: Any) -> dict[str, Any] | None:
    """Ollama's `format` as the ChatRequest's response_format (strict: decoded under the schema).
    The schema's limits and compilation are /v1's; their errors are renamed `format` (ollama_error)."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value, "strict": True}}
    raise InvalidInput('format: must be "json" or a JSON schema object')


def chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: a call gets an id, and a tool result the id of the call it
    answers (the first unanswered one of its tool_name, or the first unanswered one), so the
    template path (tool_calls.template_messages) renders both as it does /v1's."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, tool name), in the order they were made
    for n, m in enumerate(messages):
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            calls = []
            for k, call in enumerate(m.tool_calls):
                call_id = call.id or f"call_{n}_{k}"
                unanswered.append((call_id, call.function.name))
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": call.function.name,
                                           "arguments": json.dumps(call.function.arguments, ensure_ascii=False)}})
            turn["tool_calls"] = calls
        if m.role == "tool":
            match = next((u for u in unanswered if m.tool_name in (None, "", u[1])), None)
            if match is not None:
                unanswered.remove(match)
                turn["tool_call_id"] = match[0]
        out.append(turn)
    return out


def chat_call(raw: bytes, served_ctx: int | None) -> OllamaCall:
    body: ChatBody = parse(ChatBody, raw)
    _check_num_ctx(body.options, served_ctx)
    messages = chat_messages(body.messages)
    if body.system:
        messages.insert(0, {"role": "system", "content": body.system})
    fields = {"model": _model_name(body.model), "messages": messages or [{"role": "user", "content": ""}],
              "stream": body.stream, **(body.options.fields() if body.options else {})}
    fmt = response_format(body.format)
    if fmt is not None:
        fields["response_format"] = fmt
    if body.tools:
        fields["tools"] = body.tools  # Ollama has no tool_choice: tools present means auto
    return OllamaCall("chat", body.model, _internal(ChatRequest, fields), empty=not body.messages)


def generate_call(raw: bytes, served_ctx: int | None) -> OllamaCall:
    body: GenerateBody = parse(GenerateBody, raw)
    _check_num_ctx(body.options, served_ctx)
    common = {"model": _model_name(body.model), "stream": body.stream,
              **(body.options.fields() if body.options else {})}
    if body.raw:
        request = _internal(CompletionRequest, {**common, "prompt": body.prompt})
    else:  # Ollama renders a prompt with the model's chat template unless it is raw
        fmt = response_format(body.format)
        if fmt is not None:
            common["response_format"] = fmt
        messages = [{"role": "system", "content": body.system}] if body.system else []
        request = _internal(ChatRequest, {**common, "messages": [*messages, {"role": "user", "content": body.prompt}]})
    return OllamaCall("generate", body.model, request, empty=not body.prompt)


class NdjsonRenderer:
    """Ollama's lines for one answer, and its closing statistics (durations in nanoseconds)."""

    def __init__(self, call: OllamaCall) -> None:
        self._call = call
        self._started = time.monotonic_ns()
        self._first = 0
        self.renderer = Renderer(media_type=NDJSON, lines=self.lines, error_line=self.error_line, whole=self.whole)

    def _line(self, text: str, calls: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
        piece: dict[str, Any] = ({"message": {"role": "assistant", "content": text}} if self._call.kind == "chat"
                                 else {"response": text})
        if calls:
            piece["message"]["tool_calls"] = calls
        return {"model": self._call.name, "created_at": _now(), **piece, **extra}

    def _final(self, answer: Answer, text: str = "", calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        now = time.monotonic_ns()
        first = self._first or now
        usage = answer.usage()
        # Ollama ends a tool-calling answer with "stop" (OpenAI's "tool_calls" is not one of its reasons).
        reason = "stop" if calls or answer.finish_reason in (None, "tool_calls") else answer.finish_reason
        return self._line(text, calls, done=True, done_reason=reason,
                          total_duration=now - self._started, load_duration=0,
                          prompt_eval_count=usage.get("prompt_tokens", 0), prompt_eval_duration=first - self._started,
                          eval_count=usage.get("completion_tokens", 0), eval_duration=now - first)

    async def lines(self, answer: Answer) -> AsyncIterator[str]:
        async for delta in answer.deltas():
            if not self._first:
                self._first = time.monotonic_ns()
            if delta:  # a tool call's turn is told below, in one line (ToolCallAnswer yields "" for it)
                yield json.dumps(self._line(delta, done=False)) + "\n"
        calls = ollama_calls(answer)
        if calls:
            yield json.dumps(self._line("", calls, done=False)) + "\n"
        yield json.dumps(self._final(answer)) + "\n"

    def error_line(self, error: EdgeMeshError) -> str:
        return json.dumps({"error": str(error)}) + "\n"

    def whole(self, answer: Answer, text: str) -> dict[str, Any]:
        calls = ollama_calls(answer)
        return self._final(answer, "" if calls else text, calls)


def ollama_calls(answer: Answer) -> list[dict[str, Any]] | None:
    """A finished answer's tool calls in Ollama's shape (arguments an object), or None."""
    if not isinstance(answer, ToolCallAnswer) or not answer.calls:
        return None
    return [{"function": {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}}
            for call in answer.calls]


def loaded(call: OllamaCall) -> dict[str, Any]:
    """Ollama's answer to a call with nothing to say (it loads the model): the mesh has it placed."""
    piece: dict[str, Any] = ({"message": {"role": "assistant", "content": ""}} if call.kind == "chat"
                             else {"response": ""})
    return {"model": call.name, "created_at": _now(), **piece, "done": True, "done_reason": "load"}


# The internal request's names of what an Ollama body calls `format` (longest first).
_RENAMES = (("response_format.json_schema.schema", "format"), ("response_format.json_schema", "format"),
            ("response_format", "format"))


def ollama_error(response: Response) -> Response:
    """An error of the /v1 flow in Ollama's shape, {"error": "..."} (clients read that key),
    naming the field as the Ollama body does."""
    if response.status_code < 400 or not isinstance(response, JSONResponse):
        return response
    try:
        message = json.loads(bytes(response.body))["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response
    if isinstance(message, str):
        for internal, ollama_name in _RENAMES:
            message = message.replace(internal, ollama_name)
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse({"error": message}, status_code=response.status_code, headers=headers)


def embed_request(body: EmbedBody | LegacyEmbedBody, served_ctx: int | None) -> EmbeddingRequest:
    _check_num_ctx(body.options, served_ctx)
    value = body.input if isinstance(body, EmbedBody) else body.prompt
    dimensions = body.dimensions if isinstance(body, EmbedBody) else None
    return EmbeddingRequest(input=value, model=_model_name(body.model), dimensions=dimensions)


# ------------------------------------------------------------------ model descriptions


def _parameter_size(count: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}".rstrip("0").rstrip(".") + unit
    return str(count)


class ModelCard:
    """How the Ollama API describes the served model: computed once from its GGUF header."""

    def __init__(self, runtime: GatewayRuntime) -> None:
        summary = runtime.summary
        general = dict(summary.general)
        self.parameters = sum(_product(t.shape) for t in summary.tensors)
        file_type = general.get("general.file_type")
        by_bytes: collections.Counter[str] = collections.Counter()
        for tensor in summary.tensors:
            by_bytes[tensor.ggml_type] += tensor.n_bytes
        quantization = FILE_TYPES.get(file_type, "") if isinstance(file_type, int) else ""
        self.details = {"parent_model": "", "format": "gguf", "family": summary.architecture,
                        "families": [summary.architecture], "parameter_size": _parameter_size(self.parameters),
                        "quantization_level": quantization or (by_bytes.most_common(1)[0][0] if by_bytes else "")}
        stat = runtime.model_path.stat()
        self.modified_at = datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
        self.size = summary.file_bytes
        self.digest = runtime.model_sha
        self.names = [runtime.model_name + TAG, *(alias + TAG for alias in sorted(runtime.model_aliases))]
        self.model_info = {"general.architecture": summary.architecture, "general.parameter_count": self.parameters,
                           f"{summary.architecture}.block_count": summary.n_layers,
                           f"{summary.architecture}.context_length": summary.n_ctx_train,
                           f"{summary.architecture}.embedding_length": summary.n_embd}
        template = runtime.tokenizer.chat_template
        self.template = template.source if template is not None else ""

    def entry(self, name: str) -> dict[str, Any]:
        return {"name": name, "model": name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details}

    def tags(self) -> dict[str, Any]:
        return {"models": [self.entry(name) for name in self.names]}

    def running(self, n_ctx: int | None) -> dict[str, Any]:
        """/api/ps: the model while some placement serves it."""
        if n_ctx is None:
            return {"models": []}
        return {"models": [{**self.entry(name), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": n_ctx} for name in self.names]}

    def show(self) -> dict[str, Any]:
        return {"modelfile": "", "parameters": "", "template": self.template, "details": self.details,
                "model_info": self.model_info, "capabilities": ["completion", "embedding", "tools"],
                "modified_at": self.modified_at}

    def version(self) -> dict[str, Any]:
        return {"version": OLLAMA_API_VERSION, "edgemesh": __version__}


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


# ------------------------------------------------------------------ routes

Gate = Callable[[Request, Callable[[bytes], Any], Callable[[Any], None]], Awaitable[Any]]


def routes(runtime: GatewayRuntime, gate: Gate, admit_completion: Callable[[Any], None],
           key_of: Callable[[Request], str]) -> list[Route]:
    """Ollama's routes. `gate` is the app's one gate of API requests (body size and deadline,
    per-key counts, the admin's policy: mesh.gateway.app), `admit_completion` the limits and
    policy of a /v1 completion, `key_of` the name of a request's API key."""
    card = ModelCard(runtime)

    async def completion(request: Request, read: Callable[[bytes, int | None], OllamaCall]) -> Response:
        call = await gate(request, lambda raw: read(raw, runtime.scheduler.context_length()),
                          lambda c: admit_completion(c.request))
        if isinstance(call, Response):
            return ollama_error(call)
        if call.empty:  # Ollama's "load the model" call: placement is the controller's, so just answer
            try:
                check_model(call.request.model, runtime.model_name, runtime.model_aliases)
            except EdgeMeshError as exc:
                return ollama_error(error_response(exc))
            return JSONResponse(loaded(call))
        flavor = CHAT if isinstance(call.request, ChatRequest) else TEXT
        return ollama_error(await runtime.completions.handle(call.request, flavor, key_name=key_of(request),
                                                             render=NdjsonRenderer(call).renderer))

    async def chat(request: Request) -> Response:
        return await completion(request, chat_call)

    async def generate(request: Request) -> Response:
        return await completion(request, generate_call)

    async def embed(request: Request, schema: type[EmbedBody] | type[LegacyEmbedBody]) -> Response:
        def read(raw: bytes) -> tuple[EmbedBody | LegacyEmbedBody, EmbeddingRequest]:
            body = parse(schema, raw)
            return body, embed_request(body, runtime.scheduler.context_length())

        admitted = await gate(request, read, lambda b: runtime.policy.admit_texts(b[1].texts()))
        if isinstance(admitted, Response):
            return ollama_error(admitted)
        body, internal = admitted
        started = time.monotonic_ns()
        result = await runtime.embeddings.counted(internal, key_of(request),
                                                  truncate=not isinstance(body, EmbedBody) or body.truncate)
        if isinstance(result, Response):
            return ollama_error(result)
        vectors, n_tokens = result
        if isinstance(body, LegacyEmbedBody):
            return JSONResponse({"embedding": [float(v) for v in vectors[0]]})
        return JSONResponse({"model": body.model, "embeddings": [[float(v) for v in row] for row in vectors],
                             "total_duration": time.monotonic_ns() - started, "load_duration": 0,
                             "prompt_eval_count": n_tokens})

    async def embed_route(request: Request) -> Response:
        return await embed(request, EmbedBody)

    async def legacy_embeddings(request: Request) -> Response:
        return await embed(request, LegacyEmbedBody)

    async def tags(request: Request) -> Response:
        return JSONResponse(card.tags())

    async def running(request: Request) -> Response:
        return JSONResponse(card.running(runtime.scheduler.context_length()))

    async def version(request: Request) -> Response:
        return JSONResponse(card.version())

    async def show(request: Request) -> Response:
        body = await gate(request, lambda raw: parse(ShowBody, raw), lambda b: None)
        if isinstance(body, Response):
            return ollama_error(body)
        name = body.model or body.name or ""
        if name not in card.names and name + TAG not in card.names:
            return JSONResponse({"error": f"model {name!r} not found; available: {', '.join(card.names)}"},
                                status_code=404)
        return JSONResponse(card.show())

    return [
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", running, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/embed", embed_route, methods=["POST"]),
        Route("/api/embeddings", legacy_embeddings, methods=["POST"]),
    ]
