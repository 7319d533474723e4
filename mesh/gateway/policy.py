"""The admin's policy on conversations: a system prompt that opens every chat, and deny
patterns checked on prompts and on answers as they stream.

Deny patterns are Python regular expressions, compiled case-insensitively at start (an
admin who denies "project falcon" means "Project Falcon" too; `(?-i:...)` makes a part
case-sensitive). A prompt that matches is refused (400, code `content_policy`); an answer
that would match is cut before the match and ends with finish_reason `content_filter`.

A match may span several tokens, so the answer filter holds back the last K characters of
the text: K is the longest match any pattern can make (from the regex itself: 6 for
`secret`, 13 for `secret\\s?\\d{1,6}`), at most HOLD_CAP. With patterns of bounded width no
character of a match is ever sent; an unbounded pattern (`secret.*plan`) or one wider than
HOLD_CAP may have the start of a long match sent before the answer is cut at its end.
Holding back costs nothing in throughput, only K characters of delay on a streamed answer.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from mesh.errors import ConfigError, EdgeMeshError, InvalidInput
from mesh.gateway import logprobs
from mesh.gateway.answers import Answer
from mesh.gateway.schemas import ChatRequest, CompletionRequest, _Common
from mesh.metrics import GatewayMetrics

log = logging.getLogger(__name__)

HOLD_CAP = 128  # most characters of an answer held back; the delay of a streamed answer
MAX_SYSTEM_PROMPT_BYTES = 64 * 1024  # an admin's preamble, not a document: longer is a mistake
CONTENT_FILTER = "content_filter"  # OpenAI's finish_reason for an answer stopped by a filter


class ContentPolicyViolation(InvalidInput):
    """A prompt matches a deny pattern. Names the rule by number, never the pattern (which
    may itself be confidential) nor the matched text."""

    openai_code = "content_policy"

    def __init__(self, rule: DenyRule) -> None:
        super().__init__(f"the prompt is refused by this gateway's content policy (rule {rule.label})")
        self.rule = rule


class SystemPromptEnforced(EdgeMeshError):
    """A raw completion on a gateway whose admin set a system prompt: it cannot carry one."""

    http_status = 403
    kind = "permission_error"


@dataclass(frozen=True)
class DenyRule:
    label: str  # its number among the --deny-pattern flags, from 1: the metrics' `rule` label
    pattern: re.Pattern[str]
    width: int | None  # the longest text it can match, None when unbounded (or unknown)

    @property
    def hold(self) -> int:
        return HOLD_CAP if self.width is None else min(self.width, HOLD_CAP)


def _widths(pattern: re.Pattern[str]) -> tuple[int, int | None] | None:
    """(shortest, longest or None if unbounded) text the pattern can match, from the regex
    parser of the standard library (re._parser from 3.11, sre_parse before); None when that
    parser is not there."""
    try:
        parser: Any = importlib.import_module("re._parser")
    except ImportError:  # Python 3.10
        parser = importlib.import_module("sre_parse")
    try:
        low, high = parser.parse(pattern.pattern, pattern.flags).getwidth()
    except (AttributeError, TypeError, ValueError, re.error):  # an internal API: if it changes, be safe
        return None
    return int(low), (int(high) if high < parser.MAXREPEAT else None)


def compile_rules(patterns: Sequence[str]) -> tuple[DenyRule, ...]:
    """The --deny-pattern flags as rules; a pattern that does not compile, or that can match
    empty text (it would match everywhere), is a ConfigError naming it."""
    rules = []
    for number, source in enumerate(patterns, start=1):
        try:
            pattern = re.compile(source, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"--deny-pattern {number} ({source!r}) is not a valid regular expression: "
                              f"{exc}") from None
        widths = _widths(pattern)
        if (widths is not None and widths[0] == 0) or pattern.fullmatch(""):
            raise ConfigError(f"--deny-pattern {number} ({source!r}) can match empty text, so it would "
                              "match every prompt: make it match at least one character")
        rules.append(DenyRule(str(number), pattern, widths[1] if widths is not None else None))
    return tuple(rules)


def read_system_prompt(path: str) -> str:
    """The system prompt file's text, stripped; a clear ConfigError when it is missing,
    unreadable, empty, too large or not UTF-8."""
    file = Path(path)
    try:
        raw = file.read_bytes() if file.stat().st_size <= MAX_SYSTEM_PROMPT_BYTES else None
    except OSError as exc:
        raise ConfigError(f"--system-prompt-file {path}: cannot read it ({exc.strerror or exc})") from None
    if raw is None:
        raise ConfigError(f"--system-prompt-file {path} is larger than {MAX_SYSTEM_PROMPT_BYTES} bytes; a "
                          "system prompt opens every conversation and takes room from each one's context")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--system-prompt-file {path} is not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise ConfigError(f"--system-prompt-file {path} is empty; write the prompt into it or drop the flag")
    return text


class AnswerFilter:
    """One answer's text through the deny rules: `push` each delta and send what it returns,
    then `finish`. Once `blocked` is set, nothing more is released."""

    def __init__(self, rules: Sequence[DenyRule]) -> None:
        self._rules = rules
        self._hold = max((r.hold for r in rules), default=0)
        self._text = ""
        self._sent = 0  # characters released
        self.blocked: DenyRule | None = None

    def push(self, delta: str) -> str:
        if self.blocked is not None or not delta:
            return ""
        before = len(self._text)
        self._text += delta
        return self._release(self._scan(before, final=False))

    def finish(self) -> str:
        if self.blocked is not None:
            return ""
        return self._release(self._scan(0, final=True))

    def _scan(self, before: int, *, final: bool) -> int:
        """How far the text may be released. A match that reaches the end of the text so far
        is not yet certain (`\\bsecret\\b` on "...secret" before "ary" arrives), so it only
        holds the text back from its start; a certain one (or any at the end) blocks."""
        text = self._text
        limit = len(text) if final else len(text) - self._hold
        block: tuple[int, DenyRule] | None = None
        for rule in self._rules:
            # A new match ends in the new text, so it starts at most `width` before it; an
            # unbounded rule is searched from the start. Text before `pos` stays visible to
            # look-behinds and \b.
            pos = 0 if final or rule.width is None else max(0, before - rule.width)
            for match in rule.pattern.finditer(text, pos):
                if match.end() == match.start():
                    continue
                if final or match.end() < len(text):
                    if block is None or match.start() < block[0]:
                        block = (match.start(), rule)
                else:
                    limit = min(limit, match.start())
                break
        if block is not None:
            self.blocked = block[1]
            return block[0]
        return limit

    @property
    def released(self) -> int:
        """Characters of the answer released so far."""
        return self._sent

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out = self._text[self._sent:upto]
        self._sent = upto
        return out


class FilteredAnswer(Answer):
    """An answer (mesh or cloud) through the deny rules. A block closes the inner answer at
    once, which ends the generation on its node (or the cloud request), and the answer ends
    with finish_reason content_filter."""

    def __init__(self, inner: Answer, policy: GatewayPolicy) -> None:
        self._inner = inner
        self._policy = policy
        self.route = inner.route
        self.request_id = inner.request_id
        self.header = inner.header
        # The inner answer's logprobs, each with the end of the text it came with: released
        # only once all that text is, so a blocked answer's logprobs never show what was cut.
        self._held: list[tuple[int, dict[str, Any]]] = []
        self._ready: list[dict[str, Any]] = []

    def _hold_logprobs(self, end: int) -> None:
        part = self._inner.take_logprobs()
        if part is not None:
            self._held.append((end, part))

    def _release_logprobs(self, released: int) -> None:
        while self._held and self._held[0][0] <= released:
            self._ready.append(self._held.pop(0)[1])

    def take_logprobs(self) -> dict[str, Any] | None:
        parts, self._ready = self._ready, []
        return logprobs.join(parts)

    async def deltas(self) -> AsyncIterator[str]:
        text = AnswerFilter(self._policy.rules)
        received = 0
        # Every Answer.deltas() is an async generator: closing it ends the generation now.
        inner = cast(AsyncGenerator[str, None], self._inner.deltas())
        async with contextlib.aclosing(inner):
            async for delta in inner:
                received += len(delta)
                self._hold_logprobs(received)
                out = text.push(delta)
                self._release_logprobs(text.released)
                if out:
                    yield out
                if text.blocked is not None:
                    break
            if text.blocked is None:
                self._hold_logprobs(received)
                tail = text.finish()
                self._release_logprobs(received)
                if tail:
                    yield tail
        if text.blocked is not None:
            self.finish_reason = CONTENT_FILTER
            self._policy.count_block(text.blocked, "answer")
            log.warning("answer %s stopped by deny rule %s", self.request_id, text.blocked.label)
        else:
            self.finish_reason = self._inner.finish_reason

    def usage(self) -> dict[str, int]:
        # Tokens generated count, sent or not: the node did the work.
        return self._inner.usage()


class GatewayPolicy:
    """The admin's system prompt and deny rules, as the gateway applies them."""

    def __init__(self, system_prompt: str = "", rules: Sequence[DenyRule] = (),
                 metrics: GatewayMetrics | None = None) -> None:
        self.system_prompt = system_prompt
        self.rules = tuple(rules)
        self._metrics = metrics

    @classmethod
    def from_flags(cls, system_prompt_file: str, deny_patterns: Sequence[str],
                   metrics: GatewayMetrics | None = None) -> GatewayPolicy:
        rules = compile_rules(deny_patterns)
        prompt = read_system_prompt(system_prompt_file) if system_prompt_file else ""
        if prompt:
            log.info("every chat opens with the system prompt of %s (%d characters)", system_prompt_file,
                     len(prompt))
        if rules:
            log.info("%d deny pattern(s): %s", len(rules),
                     ", ".join(f"{r.label}={r.pattern.pattern!r}" for r in rules))
        return cls(prompt, rules, metrics)

    def count_block(self, rule: DenyRule, where: str) -> None:
        if self._metrics is not None:
            self._metrics.policy_blocks.labels(rule.label, where).inc()

    def admit(self, body: _Common) -> None:
        """Refuse a request the policy does not allow: a raw completion when a system prompt is
        set (it could not carry it: the client would bypass the admin), a prompt that matches a
        deny rule. The admin's own system prompt is not checked."""
        if isinstance(body, CompletionRequest):
            if self.system_prompt:
                raise SystemPromptEnforced("this gateway opens every conversation with its admin's system "
                                           "prompt, which a raw completion cannot carry: use /v1/chat/completions")
            self._check_texts([body.prompt_text()])
        elif isinstance(body, ChatRequest):
            self._check_texts(m.text() for m in body.messages)

    def admit_texts(self, texts: Iterable[str]) -> None:
        """The deny rules over texts other than a prompt (embeddings inputs): sent to a node all the same."""
        self._check_texts(texts)

    def _check_texts(self, texts: Iterable[str]) -> None:
        if not self.rules:
            return
        for text in texts:  # each message on its own: the boundary between two is no text
            for rule in self.rules:
                if rule.pattern.search(text):
                    self.count_block(rule, "prompt")
                    log.info("prompt refused by deny rule %s", rule.label)
                    raise ContentPolicyViolation(rule)

    def chat_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation to render locally: the admin's system prompt first. A client's own
        leading system message is joined after it into one system message, since many chat
        templates know only one, at the start (some refuse a second)."""
        if not self.system_prompt:
            return messages
        if messages and messages[0].get("role") == "system":
            joined = self.system_prompt + "\n\n" + str(messages[0].get("content") or "")
            return [{**messages[0], "content": joined}, *messages[1:]]
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def cloud_messages(self, messages: list[Any]) -> list[Any]:
        """The conversation sent to a cloud API (OpenAI's shape, which takes several system
        messages): the admin's first, the client's messages as they came."""
        if not self.system_prompt:
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def filter(self, answer: Answer) -> Answer:
        return FilteredAnswer(answer, self) if self.rules else answer
