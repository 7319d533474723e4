"""OpenAI-compatible request bodies, validated strictly (wrong types are 400s, not coerced).

No field is silently ignored: a client that asked for something and got something else
is worse off than one told no. Every field of OpenAI's chat and completions requests is
one of three kinds (tests/unit/test_api_schema_walk.py walks the official client's schema
and fails on a field that is none of them):
- implemented (declared below, and used);
- informational (INFORMATIONAL: it asks for nothing in the answer, such as `user` or
  `metadata`, so accepting it changes nothing the client could see);
- not supported yet (UNSUPPORTED): accepted only at the value that asks for nothing
  (tools [], response_format text...), refused with a 400 naming it otherwise.
A field that is in neither OpenAI's schema nor ours is refused with a 400 naming it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh.config import Limits
from mesh.errors import InvalidInput
from mesh.types import SamplingParams

MAX_STOP_STRINGS = 8
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; completions' logprobs (5 on OpenAI) gets the same
MAX_LOGIT_BIAS = 1024  # entries; each a token id (as a string, JSON's object keys) -> -100..100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _is_empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _is_none_choice(value: Any) -> bool:
    return value is None or value in ("none", "auto")  # "auto" with no tools is "none"


# Fields that ask for nothing in the answer: accepted as they come, whatever their value.
INFORMATIONAL = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                           "prompt_cache_retention", "prompt_cache_options"})

# Not supported yet: the test that a value asks for nothing, and what the refusal says.
UNSUPPORTED_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    # The deprecated form of tools: send `tools` and `tool_choice` instead.
    "functions": (_is_empty, "function calls (the deprecated `functions`; send `tools`)"),
    "function_call": (_is_none_choice, "function calls (the deprecated `function_call`; send `tool_choice`)"),
    "audio": (lambda v: v is None, "audio output"),
    "modalities": (lambda v: v is None or v == ["text"], "output modalities other than text"),
    "prediction": (lambda v: v is None, "predicted outputs"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort"),
    "verbosity": (lambda v: v is None, "verbosity"),
    "web_search_options": (lambda v: v is None, "web search"),
    "moderation": (lambda v: v is None, "moderation"),
}
UNSUPPORTED_COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (lambda v: v is None or v == 1, "best_of above 1"),
    "echo": (lambda v: v is None or v is False, "echo"),
    "suffix": (lambda v: v is None or v == "", "suffix (fill-in-the-middle)"),
}


def _refuse_unsupported(values: dict[str, Any], table: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for name, (asks_nothing, what) in table.items():
        if name in values and not asks_nothing(values[name]):
            raise ValueError(f"{name}: EdgeMesh does not support {what} yet (send it only at its default, "
                             "or leave it out)")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=2**31)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    repeat_last_n: int = Field(default=64, ge=0, le=2**31)  # history the repeat penalty looks at (as llama.cpp)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_entries(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 10:
                raise ValueError(f"{key!r} is not a token id (keys are token ids, as strings)")
            if not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"the bias of token {key} is {bias}, outside -100..100")
        return value

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items()))

    def logprob_request(self) -> tuple[bool, int]:
        """(report the chosen tokens' log-probabilities, how many alternatives per token)."""
        raise NotImplementedError

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self) -> SamplingParams:
        # A request without a seed still gets one, fixed for the session, so a replay after a
        # failover draws exactly what the first node would have drawn.
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, repeat_penalty=self.repeat_penalty,
                              repeat_last_n=self.repeat_last_n, seed=seed,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              logit_bias=self.bias_pairs())



class TextPart(_Strict):
    type: Literal["text"]
    text: str


MAX_TOOLS = 128
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDef(_Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # always strict here: the arguments are decoded under the schema


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: json_schema is given with, and only with, type json_schema")
        return self


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # What another server's earlier turns may carry; nothing the template could render.
    refusal: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, rendered as it made them
    function_call: Any = None
    audio: Any = None

    @model_validator(mode="after")
    def _renderable(self) -> ChatMessage:
        for name in ("function_call", "audio"):
            if not _is_empty(getattr(self, name)):
                raise ValueError(f"{name} in a message is not supported by EdgeMesh yet")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries them")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Informational(_Strict):
    """INFORMATIONAL, declared (as any JSON value) so that an unknown field can be refused."""

    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None


class ChatRequest(_Common, _Informational):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # several calls in one answer; one unless true
    functions: Any = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        _refuse_unsupported({name: getattr(self, name) for name in self.model_fields_set}, UNSUPPORTED_CHAT)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: set logprobs to true to use top_logprobs")
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: two tools have the same name")
        choice = self.tool_choice
        if choice in ("required",) or isinstance(choice, NamedToolChoice):
            if not names:
                raise ValueError("tool_choice: asks for a tool call, but tools lists none")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: names {choice.function.name[:64]!r}, which is not in tools")
        if self.offers_tools() and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: EdgeMesh cannot combine structured output with tools it offers "
                             "(send tool_choice none, or no tools)")
        return self

    def logprob_request(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0

    def offers_tools(self) -> bool:
        """Tools are described to the model and may be called (tool_choice is not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def schemas(self) -> list[tuple[str, dict[str, Any]]]:
        """Every JSON schema in the request, by the field that carries it (for the limits)."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.json_schema is not None and rf.json_schema.json_schema is not None:
            found.append(("response_format.json_schema.schema", rf.json_schema.json_schema))
        for index, tool in enumerate(self.tools or ()):
            if tool.function.parameters is not None:
                found.append((f"tools[{index}].function.parameters", tool.function.parameters))
        return found

    def text_chars(self) -> int:
        """Characters of text in all the messages (what the prompt-length limit counts)."""
        return sum(len(m.text()) for m in self.messages)

    def template_messages(self) -> list[dict[str, Any]]:
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class CompletionRequest(_Common, _Informational):
    prompt: str | list[str]
    # The legacy API's form: an alternatives count, and asking at all (even 0) reports the tokens.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        _refuse_unsupported({name: getattr(self, name) for name in self.model_fields_set}, UNSUPPORTED_COMPLETION)
        return self

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def check_limits(body: _Common, limits: Limits) -> None:
    """The request limits that depend on a tunable setting (Limits); InvalidInput naming the one
    passed. The fixed ones (at most MAX_STOP_STRINGS stop strings, n = 1) are in the schema."""
    if isinstance(body, CompletionRequest) and len(body.prompt_text()) > limits.max_prompt_chars:
        raise InvalidInput(f"prompt is longer than {limits.max_prompt_chars} characters")
    if isinstance(body, ChatRequest):
        if len(body.messages) > limits.max_messages:
            raise InvalidInput(f"messages: {len(body.messages)} messages, more than the {limits.max_messages} "
                               "this gateway accepts")
        if body.text_chars() > limits.max_prompt_chars:
            raise InvalidInput(f"the messages hold more than {limits.max_prompt_chars} characters")
        from mesh.constraints import check_schema

        for where, schema in body.schemas():
            check_schema(schema, where, limits.max_schema_bytes, limits.max_schema_depth)
    longest = max((len(stop) for stop in body.stop_strings()), default=0)
    if longest > limits.max_stop_chars:
        raise InvalidInput(f"stop: a stop string of {longest} characters, longer than the {limits.max_stop_chars} "
                           "this gateway accepts")


def parse(model: type[_Strict], body: bytes) -> Any:
    """Validate a JSON body; every problem becomes one InvalidInput naming the field."""
    if not body:
        raise InvalidInput("the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown field (EdgeMesh refuses what it does not implement rather than "
                                "ignore it)")
            elif err["type"] == "value_error" and not where:
                problems.append(str(err["ctx"]["error"]) if "ctx" in err else err["msg"])  # names its field
            else:
                problems.append(f"{where or 'body'}: {err['msg']}")
        raise InvalidInput("; ".join(problems)) from None
