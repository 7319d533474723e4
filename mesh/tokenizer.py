"""Text <-> tokens for the scheduler: llama.cpp's own tokenizer (vocabulary-only load),
the GGUF's chat template rendered in a sandboxed Jinja environment under a budget, and
incremental detokenization with stop strings.

The prompt is built exactly as llama-cpp-python builds it, so the mesh and llama.cpp
see the same token ids: completions get BOS (when the model asks for it) and the text
tokenized with special tokens parsed; chats render the template with the model's BOS
and EOS strings and tokenize without adding BOS.

A chat template is code from the model file, run on every chat with the client's text.
mesh.template_check refuses, when the model loads, a template that reaches for anything
past its variables (before llama.cpp reads the file: llama-cpp-python compiles every
template it finds); Jinja's sandbox still keeps the render from reaching Python, and the
budget here keeps it from running forever or filling memory: a render stops after
`TemplateBudget.seconds`, after `max_steps` loop turns, calls, lookups and outputs, or
before it builds a value longer than `max_chars` (an operation that would is refused
before it runs). The caller runs the render on a worker thread, so the budget is what
bounds it: a thread cannot be stopped from outside.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import inspect
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from mesh.config import Limits, Timeouts
from mesh.errors import InvalidInput, ModelError
from mesh.template_check import RENDERER_GLOBALS, IgnoreGenerationTag, check_chat_template, check_model_templates

_PIECE_BUFFER = 256


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise InvalidInput(f"chat template refused the conversation: {message}")


# ---------------------------------------------------------------------------- the budget

@dataclass(frozen=True)
class TemplateBudget:
    """What one render of a chat template may spend (see the module docstring)."""

    seconds: float = Timeouts.template_render_s
    max_chars: int = Limits.template_max_chars
    max_steps: int = Limits.template_max_steps
    max_source_bytes: int = Limits.template_max_source_bytes  # checked at load (mesh.template_check)

    @classmethod
    def of(cls, timeouts: Timeouts, limits: Limits) -> TemplateBudget:
        return cls(seconds=timeouts.template_render_s, max_chars=limits.template_max_chars,
                   max_steps=limits.template_max_steps, max_source_bytes=limits.template_max_source_bytes)


# Everything a render builds, together, may be this many times max_chars: a template that
# copies the conversation a few times is fine, one that builds thousands of copies is not.
_WORK_FACTOR = 16
# Integers a template computes stay small: 2**10**9 would take minutes inside one operation.
_MAX_INT_BITS = 1 << 16
# Filters whose work is not linear in their input on every text (regular expressions, text
# wrapping) only run on texts up to this length.
_REGEX_INPUT_CAP = 100_000
_WIDTH_FILTERS = {"center", "indent", "wordwrap", "batch", "slice", "format", "replace", "join", "sum",
                  "striptags", "urlize", "pprint", "tojson"}
_DIGITS = re.compile(r"\d+")


class _OverBudget(Exception):
    """A render went over its budget; the message completes "the chat template ...". Not an
    InvalidInput, so that nothing inside Jinja mistakes it for a template's own error."""


class _Spend:
    """The budget of the render running on this thread, spent as it goes."""

    def __init__(self, budget: TemplateBudget) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget.seconds
        self.steps = budget.max_steps
        self.work = budget.max_chars * _WORK_FACTOR
        self.output = budget.max_chars

    def step(self) -> None:
        self.steps -= 1
        # The clock on every step (about 60 ns): one step can be a sort of a million-character
        # value, so checking every 64th let a render run four times past its budget.
        self.check()

    def check(self) -> None:
        if self.steps < 0:
            raise _OverBudget(f"took more than {self.budget.max_steps} steps (loop turns, calls, lookups, "
                              "outputs)")
        if time.monotonic() > self.deadline:
            raise _OverBudget(f"took longer than {self.budget.seconds:g} s")

    def need(self, chars: int, what: str = "a value") -> None:
        """Refuse, before it is built, a value of `chars` characters beyond the limit."""
        if chars > self.budget.max_chars:
            raise _OverBudget(f"would build {what} of {chars} characters (at most {self.budget.max_chars})")

    def need_int(self, value: Any, what: str) -> None:
        if isinstance(value, int) and abs(value) > self.budget.max_chars:
            raise _OverBudget(f"passed {value} as {what} (at most {self.budget.max_chars})")

    def charge(self, value: Any) -> Any:
        """Count a value a template operation built; refuse it if it is too big."""
        size = _size(value, self.budget.max_chars)
        self.need(size)
        self.work -= size
        if self.work < 0:
            raise _OverBudget(f"built more than {self.budget.max_chars * _WORK_FACTOR} characters in all")
        return value

    def emit(self, chars: int) -> None:
        self.output -= chars
        if self.output < 0:
            raise _OverBudget(f"rendered more than {self.budget.max_chars} characters")
        self.work -= chars


_active = threading.local()


def _spend() -> _Spend:
    spend: _Spend | None = getattr(_active, "spend", None)
    if spend is None:
        # Outside a render: Jinja folding constants at compile time. Refusing makes it leave
        # the expression for the render, where the budget applies.
        raise _OverBudget("ran outside a render")
    return spend


def _size(value: Any, limit: int) -> int:
    """About how many characters `value` stands for when printed (containers count what they
    hold, so a list of a thousand references to one long text is a thousand long texts),
    counted only up to just past `limit`."""
    if isinstance(value, str):
        return len(value)
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item) + 2
            stack.extend(item)
        elif isinstance(item, dict):
            total += 2 * len(item) + 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        else:  # numbers, undefined values, macros, loop helpers: short when printed
            total += 24
    return total


def _nesting(value: Any, limit: int) -> tuple[int, int]:
    """(items, deepest nesting) of a container, for what indentation adds when printed."""
    items, deepest = 0, 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and items <= limit:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, (list, tuple)):
            items += len(item)
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            items += len(item)
            stack.extend((v, depth + 1) for v in item.values())
    return items, deepest


def _check_format(spend: _Spend, pattern: str, args: Any, fields: int) -> None:
    """printf-style and str.format strings: no huge widths, and each field may repeat an argument."""
    for digits in _DIGITS.findall(pattern):
        if len(digits) > 9 or int(digits) > spend.budget.max_chars:
            shown = digits if len(digits) <= 12 else digits[:12] + "..."
            raise _OverBudget(f"asked for a formatted field {shown} characters wide (at most "
                              f"{spend.budget.max_chars})")
    for arg in args if isinstance(args, (tuple, list)) else [args]:
        spend.need_int(arg, "a width")
    spend.need(len(pattern) + max(fields, 1) * _size(args, spend.budget.max_chars), "a formatted text")


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # Jinja passes a context/environment first to filters that ask for one (`first`); for the
    # async-capable ones the wrapper asks for it while the function it wraps does not (`skip`).
    first = 1 if hasattr(func, "jinja_pass_arg") else 0
    inner = inspect.unwrap(func)
    skip = first if not hasattr(inner, "jinja_pass_arg") else 0
    signature = inspect.signature(inner) if name in _WIDTH_FILTERS else None

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        spend = _spend()
        spend.step()
        if signature is not None and len(args) > first:
            if name == "join" and not isinstance(args[first], (list, tuple, str)):
                # The items are needed to size the result; the join then reads the same list.
                args = (*args[:first], list(args[first]), *args[first + 1:])
            bound = signature.bind(*args[skip:], **kwargs)
            bound.apply_defaults()
            _check_filter(spend, name, dict(bound.arguments), args[first])
        return spend.charge(func(*args, **kwargs))

    return guarded


def _check_filter(spend: _Spend, name: str, given: dict[str, Any], value: Any) -> None:
    limit = spend.budget.max_chars
    text = value if isinstance(value, str) else ""
    if name == "center":
        spend.need_int(given["width"], "the width of center")
    elif name == "indent":
        width = given["width"]
        pad = width if isinstance(width, int) else len(str(width))
        spend.need_int(pad, "the width of indent")
        spend.need(len(text) + (text.count("\n") + 1) * max(pad, 0), "an indented text")
    elif name in ("batch", "slice"):
        spend.need_int(given.get("linecount", given.get("slices")), f"the count of {name}")
    elif name == "format":
        _check_format(spend, text, (*given.get("args", ()), *given.get("kwargs", {}).values()),
                      text.count("%"))
    elif name == "replace":
        old, new, count = str(given["old"]), str(given["new"]), given["count"]
        times = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            times = min(times, count)
        spend.need(len(text) + times * len(new), "a replaced text")
    elif name == "join" and isinstance(value, (list, tuple, str)):  # a text joins its characters
        spend.need(_size(value, limit) + len(str(given["d"])) * len(value), "a joined text")
    elif name == "sum":
        if not isinstance(given["start"], (int, float)):
            raise _OverBudget("used sum on something other than numbers")
    elif name in ("striptags", "urlize", "wordwrap"):
        if _size(value, limit) > _REGEX_INPUT_CAP:
            raise _OverBudget(f"used {name} on a text longer than {_REGEX_INPUT_CAP} characters")
        if name == "wordwrap":
            spend.need(len(text) * (1 + len(str(given["wrapstring"] or "\n"))), "a wrapped text")
    elif name in ("pprint", "tojson"):
        indent = given.get("indent") or 0
        pad = indent if isinstance(indent, int) else len(str(indent))
        spend.need_int(pad, f"the indent of {name}")
        # The value itself is within the limits (every value a template builds is); what printing
        # adds beyond quotes and escapes is the indentation of every item at its depth.
        items, depth = _nesting(value, limit)
        spend.need(_size(value, limit) + items * (2 + max(pad, 0) * depth), "a printed value")


def _str_method(obj: Any) -> tuple[str, str] | None:
    """(text, method name) when `obj` is a method of a text (str.format is wrapped by the sandbox)."""
    target = getattr(obj, "__wrapped__", obj)
    owner = getattr(target, "__self__", None)
    return (owner, target.__name__) if isinstance(owner, str) else None


def _check_call(spend: _Spend, obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a call to a text method that would build too long a text; returns the arguments
    to call it with (the items of a join, read once into a list so that they can be sized)."""
    method = _str_method(obj)
    if method is None:
        return args
    for arg in (*args, *kwargs.values()):  # the widths and counts of ljust, zfill, center...
        spend.need_int(arg, "an argument")
    text, name = method
    if name in ("format", "format_map"):
        _check_format(spend, text, (*args, *kwargs.values()), text.count("{"))
    elif name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        times = text.count(old) if old else len(text) + 1
        spend.need(len(text) + times * len(new), "a replaced text")
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple, str)) else list(args[0])
        spend.need(_size(items, spend.budget.max_chars) + len(text) * len(items), "a joined text")
        args = (items, *args[1:])
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        spend.need(len(text) + text.count("\t") * (tab if isinstance(tab, int) else 8), "an expanded text")
    elif name in ("translate", "maketrans"):  # a table can map each character to a long text
        raise _OverBudget(f"called str.{name}, which chat templates may not use")
    return args


def _budgeted_range(*args: int) -> range:
    spend = _spend()
    spend.step()
    span = range(*args)
    try:
        items = len(span)
    except OverflowError:
        items = spend.budget.max_steps + 1
    if items > spend.budget.max_steps:
        shown = ", ".join(str(a) for a in args)
        raise _OverBudget(f"asked for range({shown}) of {items} items (a render may take "
                          f"{spend.budget.max_steps} steps)")
    return span


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    spend = _spend()
    for item in iterable:
        spend.step()
        yield item


def _meter_loop(value: Any) -> Iterator[Any]:
    spend = _spend()
    spend.step()
    return _counted(value)


def _meter_output(value: Any) -> str:
    spend = _spend()
    spend.step()
    if isinstance(value, str):
        text = value
    else:  # sized before it is printed: a list's text can be far longer than the list
        spend.need(_size(value, spend.budget.max_chars), "an output")
        text = str(value)
    spend.emit(len(text))
    return text


def _meter_value(value: Any) -> Any:
    spend = _spend()
    spend.step()
    return spend.charge(value)


_LOOP, _OUTPUT, _VALUE = "edgemesh.loop", "edgemesh.output", "edgemesh.value"


class _Meter(NodeTransformer):
    """Rewrites a parsed template so that every loop turn, every output and every `~`
    concatenation goes through the budget (the sandbox already routes calls, lookups and
    the intercepted operators through it)."""

    @staticmethod
    def _wrap(node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, _LOOP)  # type: ignore[arg-type] # a loop's iterable is an Expr
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [self._wrap(child, _OUTPUT) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._wrap(node, _VALUE)


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every operation that can loop or grow a value charged
    to the render's budget."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                         extensions=[IgnoreGenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters["from_json"] = json.loads  # llama.cpp's own renderer has it; DeepSeek's templates use it
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP] = _meter_loop
        self.filters[_OUTPUT] = _meter_output
        self.filters[_VALUE] = _meter_value
        self.globals["range"] = _budgeted_range
        # Only the globals the load-time check lets templates name (lipsum writes paragraphs by
        # the thousand; cycler and joiner no chat template needs): a name read before the
        # template sets it, which the check cannot order, finds nothing.
        self.globals = {name: value for name, value in self.globals.items() if name in RENDERER_GLOBALS}

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        spend = _spend()
        spend.step()
        limit = spend.budget.max_chars
        sequences = (str, list, tuple)
        if operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            spend.need(_size(left, limit) + _size(right, limit))
        elif operator == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, sequences) and isinstance(times, int):
                spend.need(_size(seq, limit) * max(times, 0))
            elif isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise _OverBudget(f"multiplied numbers of more than {_MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(left.bit_length(), 1) * right > _MAX_INT_BITS and abs(left) > 1:
                raise _OverBudget(f"raised a number to a power of more than {_MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_format(spend, left, right, left.count("%"))
        return spend.charge(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        spend = _spend()
        spend.step()
        args = _check_call(spend, __obj, args, kwargs)
        return spend.charge(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _spend().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _spend().step()
        return super().getitem(obj, argument)


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template, compiled once; `render` runs it under `budget`. It does not
    run mesh.template_check (Tokenizer does, at load): the sandbox and the budget hold on
    their own, and tests hold them to that."""

    source: str
    bos_token: str
    eos_token: str
    budget: TemplateBudget = field(default_factory=TemplateBudget)

    def __post_init__(self) -> None:
        compiled: jinja2.Template | None = None
        problem = ""
        try:
            env = _BudgetedSandbox()
            tree = env.parse(self.source)
            _Meter().visit(tree)
            compiled = env.from_string(tree)
        except jinja2.TemplateError as exc:
            problem = f"chat template failed to render: {exc}"
        except (RecursionError, MemoryError, SyntaxError, ValueError) as exc:  # absurd nesting or size
            problem = f"the model's chat template cannot be compiled: {type(exc).__name__}: {exc}"
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_problem", problem)

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        compiled: jinja2.Template | None = getattr(self, "_compiled")  # noqa: B009 - set in __post_init__
        if compiled is None:
            raise InvalidInput(getattr(self, "_problem"))  # noqa: B009
        _active.spend = _Spend(self.budget)
        try:
            return compiled.render(
                messages=list(messages), bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=True, raise_exception=_raise,
                strftime_now=lambda fmt: datetime.now().strftime(fmt),
            )
        except InvalidInput:
            raise
        except _OverBudget as exc:
            raise InvalidInput(f"the model's chat template went over its budget on this conversation: it "
                               f"{exc}") from None
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"chat template failed to render: {exc}") from exc
        except RecursionError:
            raise InvalidInput("the model's chat template went over its budget on this conversation: it "
                               "recursed deeper than Python allows") from None
        except Exception as exc:  # noqa: BLE001 - the template's own fault (1/0, 2.0**5000...), not ours
            raise InvalidInput(f"the model's chat template failed on this conversation: "
                               f"{type(exc).__name__}: {exc}") from None
        finally:
            _active.spend = None


# Chat formats for GGUFs that carry no `tokenizer.chat_template`, by `general.architecture`.
# Gemma's turns: the system text opens the first user turn (Gemma has no system role), the
# assistant speaks as `model`, and the prompt ends by opening the model's turn.
_GEMMA_TURNS = """{{ bos_token }}
{%- set state = namespace(system='') -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- set state.system = state.system + (message['content'] | trim) + '\n\n' -%}
  {%- elif message['role'] in ('user', 'assistant') -%}
    {%- set speaker = 'model' if message['role'] == 'assistant' else 'user' -%}
    {{ '<start_of_turn>' + speaker + '\n' }}
    {%- if speaker == 'user' -%}
      {{ state.system }}{%- set state.system = '' -%}
    {%- endif -%}
    {{ (message['content'] | trim) + '<end_of_turn>\n' }}
  {%- else -%}
    {{ raise_exception('Gemma knows the roles system, user and assistant, not ' + message['role']) }}
  {%- endif -%}
{%- endfor -%}
{%- if state.system -%}
  {{ '<start_of_turn>user\n' + (state.system | trim) + '<end_of_turn>\n' }}
{%- endif -%}
{%- if add_generation_prompt -%}
  {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""
BUILTIN_CHAT_TEMPLATES: dict[str, str] = {"gemma3": _GEMMA_TURNS}


class Tokenizer:
    """One model's vocabulary. Thread-safe for reads; loading is the only slow part."""

    def __init__(self, llm: Any, template_budget: TemplateBudget | None = None) -> None:
        import llama_cpp

        self._llm = llm
        self._vocab = llm._model.vocab
        self.n_vocab = int(llm.n_vocab())
        self.bos_id = int(llm.token_bos())
        self.eos_id = int(llm.token_eos())
        self.add_bos = bool(llm._model.add_bos_token()) and self.bos_id >= 0
        self.add_eos = bool(llm._model.add_eos_token())
        self.eog_ids = frozenset(i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, i))
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()
        metadata: dict[str, str] = dict(llm.metadata or {})
        # A file without a template of its own gets the built-in one of its architecture, if any.
        architecture = metadata.get("general.architecture", "")
        own = metadata.get("tokenizer.chat_template")
        template = own or BUILTIN_CHAT_TEMPLATES.get(architecture)
        budget = template_budget or TemplateBudget()
        if template:  # the file's were checked before llama.cpp read it (load); this is the one rendered
            check_chat_template(template, "tokenizer.chat_template" if own else f"built in for {architecture}",
                                budget.max_source_bytes)
        self.chat_template = None if not template else ChatTemplate(
            source=template,
            bos_token=self._special_text(self.bos_id),
            eos_token=self._special_text(self.eos_id),
            budget=budget,
        )

    @classmethod
    def load(cls, path: Path, template_budget: TemplateBudget | None = None) -> Tokenizer:
        from llama_cpp import Llama

        # Before llama.cpp: Llama() compiles every chat template in the file.
        check_model_templates(path, (template_budget or TemplateBudget()).max_source_bytes)
        try:
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        except (ValueError, OSError) as exc:
            raise ModelError(f"llama.cpp could not read the vocabulary of {path}: {exc}") from exc
        return cls(llm, template_budget)

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(self._llm._model.token_get_text(token))

    def _tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def encode_completion(self, prompt: str) -> list[int]:
        tokens = self._tokenize(prompt, add_bos=False) if prompt else []
        if self.add_bos:
            tokens.insert(0, self.bos_id)
        if self.add_eos and self.eos_id >= 0:
            tokens.append(self.eos_id)
        return tokens

    def encode_embedding(self, text: str) -> list[int]:
        """An embeddings input, tokenized as llama.cpp's `Llama.embed` does: the vocabulary's own
        BOS/EOS, and markup in the text is plain text (no special tokens)."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)) if text else []

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of answer text already sent (by a cloud that then failed), to append to the
        prompt so the mesh continues it. Plain text: markup in it is not special here."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else []

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """The prompt of a conversation. Takes up to the template's budget plus the tokenizing of
        what it renders (most of a second for a million characters): call it off the event loop."""
        if self.chat_template is None:
            raise InvalidInput("this model has no chat template; use /v1/completions")
        return self._tokenize(self.chat_template.render(messages), add_bos=False)

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (special tokens add nothing), as llama.cpp detokenizes."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        import llama_cpp

        buffer = ctypes.create_string_buffer(_PIECE_BUFFER)
        with self._lock:
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, _PIECE_BUFFER, 0, False)
        value = bytes(buffer.raw[: max(n, 0)])
        self._pieces[token] = value
        return value

    def decode(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="ignore")


class TextStream:
    """Turns generated tokens into text deltas: holds back incomplete UTF-8 and any tail that
    could still become a stop string, and reports when a stop string has appeared."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._stop = [s for s in stop if s]
        self._pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    @property
    def decoded_chars(self) -> int:
        """Characters decoded so far: those sent plus those held back."""
        return len(self.text) + len(self._pending)

    def push(self, token: int) -> str:
        """Feed one token; return the text that is now safe to send."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._tokenizer.piece(token))
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush what was held back (unless a stop string cut it)."""
        if not self.stopped:
            self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final:
            out, self._pending = self._pending, ""
        else:
            hold = max((_overlap(self._pending, s) for s in self._stop), default=0)
            out = self._pending[: len(self._pending) - hold]
            self._pending = self._pending[len(self._pending) - hold:]
        self.text += out
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
