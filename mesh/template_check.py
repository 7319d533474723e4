"""Chat templates that cannot run code: a static check of a model's chat template, run when
the model loads, before anything compiles or renders it.

A chat template is Jinja code from the model file. llama-cpp-python compiles every template
in a GGUF when it loads the model (`Llama()` builds a Jinja2ChatFormatter per template, with
no budget), and rendering one outside a sandbox is how CVE-2024-34359 ran commands from a
model file. The gateway renders in a budgeted sandbox (mesh.tokenizer) and keeps doing so;
this check refuses, with the line and the name, any template that reaches for what chat
templates have no use for:

- attributes that lead to Python internals: a name starting with `_` (`__class__`,
  `__globals__`, `_x`) or a known interpreter attribute without one (`mro`, `gi_frame`,
  `f_globals`...), as `x.name`, `x['name']` or the name given to `attr`, `map(attribute=...)`;
  any other plain name passes, since messages and tools are dicts whose keys templates read
  as attributes (`message.role`, `tool.function.name`);
- a variable that is neither set by the template itself nor in `ALLOWED_GLOBALS`: what the
  renderer passes plus the optional variables real templates test for (`tools`, `documents`,
  `enable_thinking`...). `self`, `cycler`, `joiner`, `lipsum`, `config`, `request` are refused;
- a filter or test outside `ALLOWED_FILTERS` / `ALLOWED_TESTS`, by tag or by name inside
  `map`, `select`, `selectattr`...;
- another template (`import`, `from`, `include`, `extends`: the renderer has no loader) or any
  statement outside plain Jinja (`ALLOWED_NODES`);
- a constant expression Jinja would fold into a huge value while compiling (`'x' * 10**10`,
  `'x' | center(10**10)`): compiling is not budgeted in llama-cpp-python;
- a source over `Limits.template_max_source_bytes`, or nesting deeper than `MAX_DEPTH`.

Names computed at render time (`x[key]` with a variable key) cannot be checked here; the
sandbox still refuses them when the template renders. The allow-lists are what the 70 real
templates shipped in llama.cpp's models/templates use (all pass), plus their obvious kin.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mesh.config import Limits
from mesh.errors import UnsafeChatTemplate


class IgnoreGenerationTag(jinja2.ext.Extension):
    """HF chat templates may mark assistant turns with {% generation %}; it only matters for training."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 declares it as a plain attribute

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


# What the renderer passes (mesh.tokenizer.ChatTemplate.render) and the Jinja globals it keeps.
RENDERER_GLOBALS = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
                              "strftime_now", "range", "namespace", "dict"})
# Optional variables real templates read when the caller passes them (HF apply_chat_template's
# keyword arguments) and otherwise test with `is defined`: undefined here, which they handle.
OPTIONAL_VARIABLES = frozenset({
    "tools", "custom_tools", "builtin_tools", "tools_in_user_message", "tool_choice", "documents",
    "date_string", "enable_thinking", "thinking", "reasoning_effort", "model_identity", "add_vision_id",
    "keep_past_thinking", "xml_tools", "python_tools", "citation_mode", "safety_mode", "available_tools",
    "system_message", "tools_json", "json_schema", "response_format", "parallel_tool_calls", "thinking_budget",
    "add_thinking", "truncate_history_thinking", "force_thinking", "continue_final_message",
    "clear_thinking", "preserve_thinking", "thinking_mode", "reasoning", "system_prompt", "default_system",
    "tool_definitions", "preserve_reasoning", "max_thinking_tokens", "enable_reasoning", "use_json_tooldef",
    "enable_citations", "image_prompts", "datetime", "controls", "current_date", "has_tool_sep",
    "fallback_strategy", "add_thoughts", "response_schema", "functions", "function_call", "knowledge_cutoff",
    "reasoning_strength", "tool_namespace_descriptions",
})
# Names Jinja defines inside loops, macros and call blocks.
_IMPLICIT = frozenset({"loop", "caller", "varargs", "kwargs"})
ALLOWED_GLOBALS = RENDERER_GLOBALS | OPTIONAL_VARIABLES

# Filters real chat templates use, and their plain kin. Left out: `attr` (an attribute by a
# name computed at render time: the one filter whose point is what this check forbids),
# `pprint` (Python reprs of objects: addresses, internals), `random` (a prompt must not change
# between two renders of one conversation), `xmlattr`, `urlize`, `urlencode`, `filesizeformat`,
# `striptags`, `wordwrap`, `truncate` (HTML and prose helpers no chat format needs; several
# run regular expressions over the whole conversation).
# `from_json` is not Jinja's: llama.cpp's renderer has it, DeepSeek's templates use it, and
# mesh.tokenizer's renderer has it too.
ALLOWED_FILTERS = frozenset({
    "abs", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e", "escape", "first",
    "float", "forceescape", "format", "from_json", "groupby", "indent", "int", "items", "join", "last",
    "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round",
    "safe", "select", "selectattr", "slice", "sort", "string", "sum", "title", "tojson", "trim", "unique",
    "upper", "wordcount",
})
# Tests: types, comparisons, `defined`. Left out: `filter` and `test` (ask which filters and
# tests exist: nothing a chat format needs), `callable` (probes objects).
ALLOWED_TESTS = frozenset({
    "boolean", "defined", "divisibleby", "eq", "equalto", "escaped", "even", "false", "float", "ge",
    "greaterthan", "gt", "in", "integer", "iterable", "le", "lessthan", "lower", "lt", "mapping", "ne", "none",
    "number", "odd", "sameas", "sequence", "string", "true", "undefined", "upper", "==", "!=", "<", "<=",
    ">", ">=",
})
# Interpreter attributes reachable without an underscore: frames, code, generator and
# coroutine internals, Python 2 function attributes, the method resolution order.
DENIED_ATTRIBUTES = frozenset({
    "mro", "func_globals", "func_code", "func_closure", "func_defaults", "func_dict", "im_func", "im_self",
    "im_class", "gi_frame", "gi_code", "gi_yieldfrom", "gi_running", "cr_frame", "cr_code", "cr_await",
    "cr_origin", "ag_frame", "ag_code", "ag_await", "f_globals", "f_locals", "f_builtins", "f_back", "f_code",
    "f_trace", "tb_frame", "tb_next", "co_code", "co_consts", "co_names", "co_filename",
    # the sandbox wraps str.format, but format_map takes any mapping and translate any table
    "format_map", "translate", "maketrans",
})
# Statements and expressions of plain Jinja. Anything else (Import, FromImport, Include,
# Extends, extension nodes) is refused.
ALLOWED_NODES: frozenset[type[nodes.Node]] = frozenset({
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Const, nodes.Name, nodes.NSRef, nodes.Getattr,
    nodes.Getitem, nodes.Slice, nodes.Call, nodes.Keyword, nodes.Filter, nodes.Test, nodes.CondExpr,
    nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos, nodes.Add, nodes.Sub, nodes.Mul, nodes.Div,
    nodes.FloorDiv, nodes.Mod, nodes.Pow, nodes.Concat, nodes.Compare, nodes.Operand, nodes.List, nodes.Tuple,
    nodes.Dict, nodes.Pair, nodes.If, nodes.For, nodes.Assign, nodes.AssignBlock, nodes.Macro, nodes.CallBlock,
    nodes.FilterBlock, nodes.With, nodes.Scope, nodes.ScopedEvalContextModifier, nodes.Continue, nodes.Break,
})
_OTHER_TEMPLATES = {nodes.Import: "import", nodes.FromImport: "from ... import", nodes.Include: "include",
                    nodes.Extends: "extends", nodes.Block: "block"}

# Deeper than any real template (the deepest of llama.cpp's 70 is 26 levels), and shallow
# enough that Jinja's compiler, which recurses a few frames per level, stays within Python's
# recursion limit.
MAX_DEPTH = 120
# Jinja folds constant expressions while it compiles; a folded value may be this big.
MAX_FOLDED = 1 << 20
# ... and all it folds together this much (every constant expression counts, its parts too:
# the compiler folds a node and then each of its parents again).
MAX_FOLDED_TOTAL = 4 * MAX_FOLDED
# Filters that take an attribute name (dotted: `a.b`) as a positional argument, and where
# (jinja2.filters' signatures); every filter's `attribute=` is checked too.
_ATTRIBUTE_ARG = {"groupby": 0, "sum": 0, "selectattr": 0, "rejectattr": 0, "sort": 2, "unique": 1, "min": 1,
                  "max": 1}
# Filters whose arguments name attributes, filters or tests.
_NAMING_FILTERS = frozenset(_ATTRIBUTE_ARG) | {"map", "select", "reject"}
# Filters whose result is no bigger than (a small multiple of) their input.
_LINEAR_FILTERS = ALLOWED_FILTERS - {"batch", "center", "format", "indent", "join", "replace", "slice",
                                     "sum", "tojson"}


def check_chat_template(source: str, name: str = "tokenizer.chat_template",
                        max_bytes: int = Limits.template_max_source_bytes) -> None:
    """Refuse `source` (raise UnsafeChatTemplate naming the problem and its line) unless it is a
    chat template that cannot reach past its variables; see the module docstring."""
    size = len(source.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise UnsafeChatTemplate(f"the chat template {name} is refused: it is {size} bytes long, more than "
                                 f"{max_bytes} (EDGEMESH_TEMPLATE_MAX_SOURCE_BYTES); real chat templates are a "
                                 "few KB")
    env = _environment()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UnsafeChatTemplate(f"the chat template {name} is refused: line {exc.lineno}: it is not valid "
                                 f"Jinja: {_one_line(exc.message or '')}") from None
    except RecursionError:
        raise UnsafeChatTemplate(f"the chat template {name} is refused: it nests deeper than Jinja can "
                                 "parse") from None
    _Walk(name).check(tree)
    # Within the depth bound and with no huge constants, compiling is safe and quick; it finds
    # what only the compiler does (CPython's limit of 20 nested loops, a filter Jinja lacks
    # outside a branch), so that llama-cpp-python's loader, which compiles as this environment
    # does, does not meet it first and fail with no clear message.
    try:
        env.compile(tree)
    except (jinja2.TemplateError, SyntaxError, RecursionError, ValueError) as exc:
        raise UnsafeChatTemplate(f"the chat template {name} is refused: it cannot be compiled: "
                                 f"{type(exc).__name__}: {_one_line(str(exc))}") from None


def check_model_templates(path: Path, max_bytes: int = Limits.template_max_source_bytes) -> None:
    """Check every chat template in a GGUF file (llama.cpp compiles them all), before the file
    is given to llama.cpp."""
    from node.gguf import chat_templates

    for key, source in chat_templates(path, max_bytes).items():
        check_chat_template(source, f"{key} of {path.name}", max_bytes)


def _one_line(text: str) -> str:
    """An error is one log line (what Jinja or Python said may have several)."""
    return " ".join(text.split())[:500]


def _environment() -> jinja2.Environment:
    """Parses as our renderer does (its extensions and whitespace options), and compiles as
    llama-cpp-python's Jinja2ChatFormatter does (the same sandbox, no filters of ours)."""
    return ImmutableSandboxedEnvironment(loader=None, trim_blocks=True, lstrip_blocks=True,
                                         extensions=[IgnoreGenerationTag, jinja2.ext.loopcontrols])


@dataclass(frozen=True)
class _Folded:
    """A constant Jinja folds while compiling: `size`, about the characters or items it holds
    (bits for an integer), and an integer's value when small enough to compute with."""

    size: int
    number: int | float | None = None
    sequence: bool = False


_SMALL_INT_BITS = 64
_DIGIT_RUNS = re.compile(r"\d+")


def _folded_const(value: Any) -> _Folded:
    if isinstance(value, bool) or value is None:
        return _Folded(5)
    if isinstance(value, int):
        return _Folded(value.bit_length(), value if value.bit_length() <= _SMALL_INT_BITS else None)
    if isinstance(value, float):
        return _Folded(24, value)
    if isinstance(value, (str, bytes)):
        return _Folded(len(value), sequence=True)
    return _Folded(24)


class _Walk:
    """One check of one parsed template."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.declared: set[str] = set(_IMPLICIT)
        self.folded: dict[int, _Folded | None] = {}  # by id(node): each subtree is folded once
        self.folded_total = 0

    def refuse(self, node: nodes.Node, what: str) -> UnsafeChatTemplate:
        return UnsafeChatTemplate(f"the chat template {self.name} is refused: line {node.lineno or 1}: {what}")

    def check(self, tree: nodes.Template) -> None:
        # In reading order (by line, and within a line operands before what applies to them:
        # `x.__class__` before `x.__class__.__mro__`), so that the problem named is the first one
        # a reader meets.
        every = sorted(self._nodes(tree), key=lambda node: node.lineno or 0)
        for node in every:  # the names the template sets, wherever it sets them
            if isinstance(node, nodes.Name) and node.ctx in ("store", "param"):
                self.declared.add(node.name)
            elif isinstance(node, nodes.Macro):
                self.declared.add(node.name)
        for node in every:
            self._check_node(node)

    def _nodes(self, tree: nodes.Node) -> Iterator[nodes.Node]:
        """Every node, children first and in order (post-order), without recursing."""
        stack: list[tuple[nodes.Node, int, bool]] = [(tree, 0, False)]
        while stack:
            node, depth, expanded = stack.pop()
            if expanded:
                yield node
                continue
            if depth > MAX_DEPTH:
                raise self.refuse(node, f"it nests more than {MAX_DEPTH} levels deep")
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in reversed(list(node.iter_child_nodes())))

    def _check_node(self, node: nodes.Node) -> None:
        kind = type(node)
        if kind in _OTHER_TEMPLATES:
            raise self.refuse(node, f"{{% {_OTHER_TEMPLATES[kind]} %}} refers to another template; a chat "
                                    "template stands alone")
        if kind not in ALLOWED_NODES:
            raise self.refuse(node, f"it uses {kind.__name__}, which is not plain Jinja")
        if isinstance(node, nodes.Getattr):
            self._attribute(node, node.attr)
            if node.attr == "format":
                self._format_fields(node)
        elif isinstance(node, nodes.NSRef):  # `{% set ns.attr = ... %}` reads `ns`
            self._attribute(node, node.attr)
            self._variable(node, node.name)
        elif isinstance(node, nodes.Getitem):
            key = _static_text(node.arg)
            if key is not None:
                self._attribute(node, key, "the key")
        elif isinstance(node, nodes.Name) and node.ctx == "load":
            self._variable(node, node.name)
        elif isinstance(node, nodes.Filter):  # {% filter %} blocks hold one too
            self._filter(node)
        elif isinstance(node, nodes.Test):
            self._test(node, node.name)
        if isinstance(node, nodes.Expr):
            self._fold(node)

    def _variable(self, node: nodes.Node, name: str) -> None:
        if name not in self.declared and name not in ALLOWED_GLOBALS:
            raise self.refuse(node, f"it reads the variable {name!r}, which the renderer does not give chat "
                                    "templates")

    def _attribute(self, node: nodes.Node, attr: str, what: str = "the attribute", where: str = "") -> None:
        if attr.startswith("_") or attr in DENIED_ATTRIBUTES:
            raise self.refuse(node, f"it reads {what} {attr!r}{where}, which leads to Python internals")

    def _test(self, node: nodes.Node, name: str) -> None:
        if name not in ALLOWED_TESTS:
            raise self.refuse(node, f"it uses the test {name!r}, which is not one chat templates may use")

    def _filter(self, node: nodes.Filter) -> None:
        name = node.name
        if name not in ALLOWED_FILTERS:
            raise self.refuse(node, f"it uses the filter {name!r}, which is not one chat templates may use")
        if name in _NAMING_FILTERS and (node.dyn_args is not None or node.dyn_kwargs is not None):
            raise self.refuse(node, f"it passes {name} arguments by * or **, which hides what they name")
        args = list(node.args)
        for keyword in node.kwargs:
            if keyword.key == "attribute":
                self._attribute_path(node, keyword.value)
        position = _ATTRIBUTE_ARG.get(name)
        if position is not None and len(args) > position:
            self._attribute_path(node, args[position])
        # The filters that name another filter or a test in a string argument.
        if name in ("map", "select", "reject", "selectattr", "rejectattr"):
            named = args[1:] if name in ("selectattr", "rejectattr") else args
            if not named or (name == "map" and any(k.key == "attribute" for k in node.kwargs)):
                return
            called = _static_text(named[0])
            if called is None:
                raise self.refuse(node, f"it gives {name} a filter or test named at render time")
            if name == "map" and called not in ALLOWED_FILTERS:
                raise self.refuse(node, f"it maps the filter {called!r}, which is not one chat templates may use")
            if name != "map":
                self._test(node, called)

    def _format_fields(self, node: nodes.Getattr) -> None:
        """`'{0.__class__}'.format(x)` reads attributes too, named inside the text."""
        text = _static_text(node.node)
        if text is None:
            return
        for field in _fields(text):
            for part in re.split(r"[.\[\]]", field)[1:]:
                if part:
                    self._attribute(node, part, where=" in a format field")

    def _attribute_path(self, node: nodes.Node, value: nodes.Expr) -> None:
        path = _static_text(value)
        if path is None:
            raise self.refuse(node, "it names an attribute at render time")
        for part in path.split("."):
            self._attribute(node, part)

    def _fold(self, node: nodes.Expr) -> _Folded | None:
        """What Jinja's compiler folds `node` into, if it is constant; refuses a huge result. Follows
        jinja2.nodes' as_const in a sandbox without intercepted operators (llama-cpp-python's)."""
        if id(node) in self.folded:
            return self.folded[id(node)]
        folded = self._folded(node)
        self.folded[id(node)] = folded
        if folded is not None and folded.size > MAX_FOLDED:
            raise self.refuse(node, f"a constant expression would be folded, when the template is compiled, "
                                    f"into about {folded.size:.3g} characters (at most {MAX_FOLDED})")
        if folded is not None and not isinstance(node, nodes.TemplateData):
            self.folded_total += folded.size
            if self.folded_total > MAX_FOLDED_TOTAL:
                raise self.refuse(node, f"its constant expressions would be folded, when the template is "
                                        f"compiled, into more than {MAX_FOLDED_TOTAL} characters")
        return folded

    def _folded(self, node: nodes.Expr) -> _Folded | None:
        if isinstance(node, nodes.Const):
            return _folded_const(node.value)
        if isinstance(node, nodes.TemplateData):
            return _Folded(len(node.data), sequence=True)
        if isinstance(node, (nodes.Neg, nodes.Pos, nodes.Not)):
            inner = self._fold(node.node)
            if inner is None:
                return None
            if isinstance(node, nodes.Not):
                return _Folded(5)
            number = -inner.number if isinstance(node, nodes.Neg) and inner.number is not None else inner.number
            return _Folded(inner.size, number)
        if isinstance(node, nodes.BinExpr):
            return self._binary(node)
        if isinstance(node, (nodes.List, nodes.Tuple)):
            items = [self._fold(item) for item in node.items]
            if any(item is None for item in items):
                return None
            return _Folded(len(items) + sum(item.size for item in items if item is not None), sequence=True)
        if isinstance(node, nodes.Dict):
            pairs = [(self._fold(p.key), self._fold(p.value)) for p in node.items]
            if any(k is None or v is None for k, v in pairs):
                return None
            return _Folded(sum(k.size + v.size + 2 for k, v in pairs if k is not None and v is not None))
        if isinstance(node, nodes.Concat):
            parts = [self._fold(part) for part in node.nodes]
            if any(part is None for part in parts):
                return None
            return _Folded(sum(_printed(part) for part in parts if part is not None), sequence=True)
        if isinstance(node, nodes.CondExpr):
            test = self._fold(node.test)
            branches = [self._fold(node.expr1)] + ([self._fold(node.expr2)] if node.expr2 is not None else [])
            if test is None or any(b is None for b in branches):
                return None
            return _Folded(max(b.size for b in branches if b is not None))
        if isinstance(node, (nodes.And, nodes.Or)):
            sides = [self._fold(node.left), self._fold(node.right)]
            if any(s is None for s in sides):
                return None
            return max(sides, key=lambda s: s.size if s is not None else 0)
        if isinstance(node, (nodes.Getitem, nodes.Getattr, nodes.Slice)):
            inner = self._fold(node.node) if not isinstance(node, nodes.Slice) else None
            return None if inner is None else _Folded(inner.size)
        if isinstance(node, (nodes.Filter, nodes.Test)):
            return self._filtered(node)
        if isinstance(node, nodes.Compare):
            return None
        return None  # names, calls (never folded in a sandbox): known only at render time

    def _binary(self, node: nodes.BinExpr) -> _Folded | None:
        left, right = self._fold(node.left), self._fold(node.right)
        if left is None or right is None:
            return None
        a, b = left.number, right.number
        if isinstance(node, nodes.Pow):
            if left.sequence or right.sequence:
                return None
            if a is None or b is None:
                return _Folded(MAX_FOLDED + 1)
            if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
                bits = int(b * math.log2(abs(a))) + 1
                if bits > _SMALL_INT_BITS:
                    return _Folded(bits)
            try:
                return _folded_const(a ** b)
            except (OverflowError, ZeroDivisionError, ValueError):
                return None
        if isinstance(node, nodes.Mul):
            if left.sequence or right.sequence:
                seq, times = (left, right) if left.sequence else (right, left)
                if times.sequence:
                    return None  # a TypeError: Jinja leaves it for the render
                count = times.number if isinstance(times.number, int) else (1 << min(max(times.size, 1), 64))
                return _Folded(seq.size * max(count, 0), sequence=True)
            if a is None or b is None:
                return _Folded(left.size + right.size)
            return _folded_const(a * b)
        if isinstance(node, nodes.Add):
            if left.sequence and right.sequence:
                return _Folded(left.size + right.size, sequence=True)
            if a is None or b is None:
                return _Folded(max(left.size, right.size) + 1)
            return _folded_const(a + b)
        if isinstance(node, nodes.Mod) and left.sequence:  # printf: fields can be wide
            numbers = [right.number] if right.number is not None else \
                [f.number for f in map(self._fold, getattr(node.right, "items", [])) if f and f.number]
            widest = max((abs(int(n)) for n in numbers if n is not None), default=0)  # '%*d' % (width, x)
            return _Folded(left.size + right.size * 4 + _pattern_width(node.left) + widest, sequence=True)
        if a is None or b is None:
            return _Folded(max(left.size, right.size))
        try:
            if isinstance(node, nodes.Sub):
                return _folded_const(a - b)
            if isinstance(node, nodes.Div):
                return _folded_const(a / b)
            if isinstance(node, nodes.FloorDiv):
                return _folded_const(a // b)
            if isinstance(node, nodes.Mod):
                return _folded_const(a % b)
        except (ZeroDivisionError, OverflowError, TypeError):
            return None
        return None

    def _filtered(self, node: nodes.Filter | nodes.Test) -> _Folded | None:
        """Jinja calls a filter or test on constants while compiling. A bound of its result: for a
        filter that does not grow its input, a multiple of the input; for one that can (`center`,
        `indent`, `join`, `replace`, printf-style `format`), the input times every number and
        length it is given."""
        if node.node is None or node.dyn_args is not None or node.dyn_kwargs is not None:
            return None
        operands = [self._fold(node.node), *(self._fold(a) for a in node.args),
                    *(self._fold(k.value) for k in node.kwargs)]
        if any(o is None for o in operands):
            return None
        known = [o for o in operands if o is not None]
        if isinstance(node, nodes.Test):
            return _Folded(5)
        total = sum(o.size for o in known)
        if node.name in _LINEAR_FILTERS:
            return _Folded(8 * total + 64, sequence=True)
        grown = _pattern_width(node.node) if node.name == "format" else 0
        product = 1
        for o in known:
            product *= max(2, abs(int(o.number)) if o.number is not None else o.size)
        return _Folded(grown + product, sequence=True)


def _printed(folded: _Folded) -> int:
    """Characters a constant prints as (`~` turns numbers to text)."""
    if folded.sequence or folded.number is None:
        return folded.size if folded.sequence else math.ceil(folded.size * 0.302) + 1
    return len(str(folded.number))


def _fields(text: str) -> Iterator[str]:
    """The field names of a str.format text, those in format specs (`{0:{1.x}}`) too."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:  # not a valid format text: the render fails on it, reading nothing
        return
    for _literal, field, spec, _conversion in parsed:
        if field:
            yield field
        if spec and "{" in spec:
            yield from _fields(spec)


def _pattern_width(node: nodes.Node) -> int:
    """The widest a printf pattern's fields make its result: the numbers written in it (`%0999d`).
    A pattern computed from more than texts cannot be read here: counted as too wide."""
    text = _static_text(node)
    if text is None:
        return MAX_FOLDED + 1
    return sum(int(run) if len(run) <= 12 else MAX_FOLDED + 1 for run in _DIGIT_RUNS.findall(text))


def _static_text(node: nodes.Node) -> str | None:
    """The text of a key or name known without rendering: a string constant, or constants joined
    with `~` or `+` (so that `'__cla' ~ 'ss__'` is seen for what it is)."""
    if isinstance(node, nodes.Const):
        return node.value if isinstance(node.value, str) else None
    if isinstance(node, nodes.Concat):
        parts = [_static_text(part) for part in node.nodes]
        return None if any(p is None for p in parts) else "".join(p for p in parts if p is not None)
    if isinstance(node, nodes.Add):
        left, right = _static_text(node.left), _static_text(node.right)
        return None if left is None or right is None else left + right
    return None
