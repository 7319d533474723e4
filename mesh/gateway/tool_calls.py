"""Structured output and tool calls on the chat API: the request's Constraint, the tools told to
the model, earlier calls fed back through the template, and a call turned into OpenAI's
`tool_calls` (whole, or streamed as `delta.tool_calls`).

The default model's chat template (SmolLM2's, Gemma 3's) has no tool syntax, so tools use one
constrained JSON format for every model: the tools are described in the system message, and a
call is the JSON object {"name": ..., "arguments": {...}} (a JSON array of them when
parallel_tool_calls is true), decoded under a grammar built from the tools' parameter schemas.
With tool_choice auto the grammar is "a call, or text that does not start with `{`, `[` or
whitespace", so the first character says which one the answer is and text streams at once.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from mesh.constraints import json_constraint, lark_json, validate
from mesh.gateway.answers import Answer
from mesh.gateway.flavors import Flavor
from mesh.gateway.schemas import ChatRequest, NamedToolChoice, Tool
from mesh.types import Constraint

# Where the text branch of tool_choice auto may not start: a call starts with `{` or `[`.
_TEXT_LEXEME = r"/[^{\[\s][\s\S]*/"


def _call_schema(tool: Tool) -> dict[str, Any]:
    arguments = tool.function.parameters or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def calls_schema(tools: list[Tool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of what a tool-calling answer is: one call, or (parallel) a list of them."""
    options = [_call_schema(tool) for tool in tools]
    one = options[0] if len(options) == 1 else {"anyOf": options}
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


def _callable(body: ChatRequest) -> list[Tool]:
    tools = list(body.tools or ())
    if isinstance(body.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == body.tool_choice.function.name]
    return tools


def constrained(body: Any) -> bool:
    """Whether a request's answer is decoded under a grammar (see constraint_of)."""
    if not isinstance(body, ChatRequest):
        return False
    rf = body.response_format
    return body.offers_tools() or (rf is not None and rf.type != "text")


def constraint_of(body: ChatRequest) -> Constraint | None:
    """The grammar a chat request's answer must follow, compiled once here (a bad one is a 400
    naming its field), or None for free text."""
    if body.offers_tools():
        schema = calls_schema(_callable(body), bool(body.parallel_tool_calls))
        if body.tool_choice in (None, "auto"):
            grammar = f"start: TEXT | call\ncall: {lark_json(json.dumps(schema))}\nTEXT: {_TEXT_LEXEME}\n"
            constraint = Constraint(kind="lark", grammar=grammar)
            validate(constraint, "tools")
            return constraint
        # The parameter schemas were held to the size and depth limits already (check_limits).
        return json_constraint(schema, "tools")
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return json_constraint("json", "response_format")
    assert rf.json_schema is not None
    schema = rf.json_schema.json_schema if rf.json_schema.json_schema is not None else {"type": "object"}
    return json_constraint(schema, "response_format.json_schema.schema")


def _tools_prompt(body: ChatRequest) -> str:
    tools = _callable(body)
    lines = ["You can call these tools:"]
    for tool in tools:
        fn = tool.function
        lines.append(f"- {fn.name}: {fn.description or ''} Parameters (JSON schema): "
                     f"{json.dumps(fn.parameters or {'type': 'object'}, separators=(',', ':'))}")
    call = '{"name": <tool name>, "arguments": <object of its parameters>}'
    if body.parallel_tool_calls:
        lines.append(f"To call tools, reply with only a JSON array of calls, each {call}.")
    else:
        lines.append(f"To call a tool, reply with only the JSON object {call}.")
    if body.tool_choice in (None, "auto"):
        lines.append("If no tool is needed, answer in plain text.")
    else:
        lines.append("You must call a tool now.")
    return "\n".join(lines)


def call_text(calls: list[dict[str, Any]]) -> str:
    """An earlier call as the model would have written it (compact JSON, as it was decoded)."""
    return json.dumps(calls[0] if len(calls) == 1 else calls, separators=(",", ":"), ensure_ascii=False)


def template_messages(body: ChatRequest, template_source: str) -> list[dict[str, Any]]:
    """The conversation for the chat template: tools described in the system message, earlier
    calls as the JSON the model emits, tool results as a `tool` turn when the template knows the
    role (it names it), else as a user turn that says which call it answers."""
    knows_tool_role = "tool" in template_source
    messages: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for m in body.messages:
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                names[call.id] = call.function.name
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = call.function.arguments
                calls.append({"name": call.function.name, "arguments": arguments})
            content = call_text(calls)
        if role == "tool" and not knows_tool_role:
            name = names.get(m.tool_call_id or "", "")
            label = f"Result of the tool call {name}".rstrip() + ":"
            if messages and messages[-1].get("tool_result"):  # several results: one user turn
                messages[-1]["content"] += f"\n{label}\n{content}"
                continue
            messages.append({"role": "user", "content": f"{label}\n{content}", "tool_result": True})
            continue
        messages.append({"role": role, "content": content})
    for turn in messages:
        turn.pop("tool_result", None)
    if body.offers_tools():
        prompt = _tools_prompt(body)
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def parse_calls(text: str) -> list[dict[str, Any]] | None:
    """OpenAI's tool_calls of an answer's text, or None when it is not a whole call (cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or "arguments" not in item:
            return None
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": item["name"],
                                   "arguments": json.dumps(item["arguments"], ensure_ascii=False)}})
    return calls or None


class ToolCallAnswer(Answer):
    """An answer that may be a tool call: text streams as content as it comes; a call is held
    until it is whole, then sent as tool_calls with finish_reason "tool_calls"."""

    def __init__(self, inner: Answer, base: Flavor) -> None:
        self._inner = inner
        self.route = inner.route
        self.request_id = inner.request_id
        self.header = inner.header
        self.calls: list[dict[str, Any]] | None = None
        self._emitting: int | None = None
        self.flavor = dataclasses.replace(base, wrap_text=self._wrap_text, wrap_delta=self._wrap_delta)

    async def deltas(self) -> AsyncIterator[str]:
        held: list[str] = []
        is_text: bool | None = None
        async for delta in self._inner.deltas():
            if is_text is None and delta:
                is_text = delta.lstrip()[:1] not in ("{", "[", "")
            if is_text:
                if held:
                    yield "".join(held)
                    held.clear()
                yield delta
            else:
                held.append(delta)
        self.finish_reason = self._inner.finish_reason
        text = "".join(held)
        self.calls = parse_calls(text) if text else None
        if self.calls is None:
            if text:
                yield text  # not a whole call (max_tokens cut it): what there is, as content
            return
        self.finish_reason = "tool_calls"
        for index in range(len(self.calls)):
            self._emitting = index
            yield ""  # one delta.tool_calls chunk per call (_wrap_delta)
        self._emitting = None

    def usage(self) -> dict[str, int]:
        return self._inner.usage()

    def take_logprobs(self) -> dict[str, Any] | None:
        # A held call's logprobs come with the chunk that sends it: the tokens are the call's text.
        return self._inner.take_logprobs()

    def _wrap_text(self, text: str) -> dict[str, Any]:
        if self.calls is not None:
            return {"message": {"role": "assistant", "content": None, "tool_calls": self.calls}}
        return {"message": {"role": "assistant", "content": text}}

    def _wrap_delta(self, text: str) -> dict[str, Any]:
        if self._emitting is None or self.calls is None:
            return {"delta": {"content": text}}
        call = self.calls[self._emitting]
        return {"delta": {"tool_calls": [{"index": self._emitting, **call}]}}


def shape(body: Any, answer: Answer, flavor: Flavor) -> tuple[Answer, Flavor]:
    """The answer and flavor a request is sent back with: a tool-calling chat gets ToolCallAnswer."""
    if isinstance(body, ChatRequest) and body.offers_tools():
        wrapped = ToolCallAnswer(answer, flavor)
        return wrapped, wrapped.flavor
    return answer, flavor
