"""Grammar-constrained decoding with llguidance: structured output and tool calls.

A `Constraint` (mesh.types) names a grammar: any JSON object, a JSON schema, or a Lark
grammar (tool calls). The gateway checks and compiles it once (a bad one is a 400 naming the
field); the node that samples the token (a replica, or a pipeline's last stage) keeps a
`Matcher` per session and masks the logits the grammar forbids (-inf) before
mesh.sampling.sample() sees them.

Determinism: the mask is a function of the tokens generated so far, nothing else. A replay
(replica `replay_tokens`, a new pipeline attempt) consumes the same tokens into a fresh
matcher and reaches the same state, so it draws what the first attempt drew.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidInput, ModelError
from mesh.types import CONSTRAINT_KINDS, Constraint

if TYPE_CHECKING:
    import llguidance

log = logging.getLogger(__name__)

# What a node accepts from a peer, whatever the gateway's tunable Limits: a bound on the
# work one request may ask of the grammar compiler.
MAX_GRAMMAR_CHARS = 1 * 2**20

# Compact JSON: no whitespace between tokens. A small model at a high temperature otherwise
# wanders in runs of spaces and newlines and never closes the object within max_tokens.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}

ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value: 0 for a scalar, 1 for a flat object or list."""
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:  # iterative: a hostile schema nested ten thousand deep must not hit the recursion limit
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth = max(depth, level + 1)
        stack.extend((child, level + 1) for child in children)
    return depth


def check_schema(schema: Any, field: str, max_bytes: int, max_depth: int) -> str:
    """The schema's JSON text, after the size and depth limits; InvalidInput naming `field`."""
    if not isinstance(schema, dict):
        raise InvalidInput(f"{field}: a JSON schema must be a JSON object")
    depth = json_depth(schema)
    if depth > max_depth:
        raise InvalidInput(f"{field}: the schema nests {depth} levels deep, more than the {max_depth} "
                           "this gateway accepts (max_schema_depth)")
    text = json.dumps(schema, separators=(",", ":"))
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidInput(f"{field}: the schema is {size} bytes, more than the {max_bytes} this gateway "
                           "accepts (max_schema_bytes)")
    return text


def json_constraint(schema: Mapping[str, Any] | str | None, field: str = "format", *,
                    max_bytes: int = MAX_GRAMMAR_CHARS, max_depth: int = 64) -> Constraint:
    """A Constraint from "json" / None (any JSON object) or a JSON schema, checked and compiled:
    what Ollama's `format` and OpenAI's response_format both come down to."""
    if schema is None or schema == "json":
        constraint = Constraint(kind="json_object")
    elif isinstance(schema, str):
        raise InvalidInput(f"{field}: must be \"json\" or a JSON schema object")
    else:
        constraint = Constraint(kind="json_schema", grammar=check_schema(dict(schema), field, max_bytes, max_depth))
    validate(constraint, field)
    return constraint


def lark_json(schema_text: str) -> str:
    """A JSON schema embedded in a Lark grammar (llguidance's %json), with the compact layout."""
    schema = json.loads(schema_text)
    schema.setdefault("x-guidance", {}).update(_JSON_OPTIONS)
    return "%json " + json.dumps(schema, separators=(",", ":"))


def compile_grammar(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint. Raises InvalidInput on a kind or text it cannot read."""
    import llguidance

    if constraint.kind not in CONSTRAINT_KINDS:
        raise InvalidInput(f"unknown constraint kind {constraint.kind!r}")
    if len(constraint.grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidInput(f"the constraint's grammar is longer than {MAX_GRAMMAR_CHARS} characters")
    if constraint.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(constraint.grammar)
    schema_text = json.dumps(ANY_OBJECT_SCHEMA) if constraint.kind == "json_object" else constraint.grammar
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema_text, overrides=_JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidInput(f"the JSON schema is not valid JSON: {exc}") from None


def validate(constraint: Constraint, field: str) -> None:
    """Compile once without a tokenizer (the gateway's check): InvalidInput naming `field`."""
    import llguidance

    try:
        grammar = compile_grammar(constraint)
    except InvalidInput as exc:
        raise InvalidInput(f"{field}: {exc}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise InvalidInput(f"{field}: the schema cannot be enforced: {problem[:300]}")


class _Vocabularies:
    """llguidance tokenizers by model file. Building one walks the whole vocabulary (about a
    second), so each file's is built once per process. The vocab-only llama.cpp model it
    tokenizes with stays loaded beside it (a few MB)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[str, tuple[Any, llguidance.LLTokenizer]] = {}

    def get(self, path: Path) -> llguidance.LLTokenizer:
        key = str(path)
        with self._lock:  # held while building: two sessions must not build the same one twice
            found = self._by_path.get(key)
            if found is None:
                found = self._build(path)
                self._by_path[key] = found
            return found[1]

    @staticmethod
    def _build(path: Path) -> tuple[Any, llguidance.LLTokenizer]:
        import llama_cpp
        from llguidance.llamacpp import lltokenizer_from_vocab

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ModelError(f"llama.cpp could not read the vocabulary of {path}")
        vocab = llama_cpp.llama_model_get_vocab(model)
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        # Every end-of-generation token ends a finished grammar, as it ends the answer.
        eog = [t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        with warnings.catch_warnings():  # llguidance calls a llama.cpp function deprecated by name, once a token
            warnings.simplefilter("ignore", DeprecationWarning)
            tokenizer = lltokenizer_from_vocab(vocab, eos_token=eog or None)
        log.info("grammar tokenizer for %s: %d tokens", path.name, n)
        return model, tokenizer


VOCABULARIES = _Vocabularies()


class Matcher:
    """One session's grammar state. Not thread-safe: one session steps on one thread at a time."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, constraint: Constraint) -> None:
        import llguidance

        self._matcher = llguidance.LLMatcher(tokenizer, compile_grammar(constraint), log_level=0)
        if self._matcher.is_error():
            raise InvalidInput(f"constraint: {self._matcher.get_error()[:300]}")
        self._n = tokenizer.vocab_size

    @classmethod
    def for_model(cls, path: Path, constraint: Constraint) -> Matcher:
        return cls(VOCABULARIES.get(path), constraint)

    def consume(self, tokens: Iterable[int]) -> None:
        """Advance past tokens generated (or replayed); one the grammar forbids is refused."""
        for token in tokens:
            if not self._matcher.consume_token(token):
                raise InvalidInput(f"token {token} does not follow the constraint: {self._matcher.get_error()[:200]}")

    def allowed(self) -> npt.NDArray[np.bool_]:
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        if self._matcher.is_error():
            raise ModelError(f"the constraint failed: {self._matcher.get_error()[:200]}")
        return np.unpackbits(bits, count=self._n, bitorder="little").astype(bool)

    def mask(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """A copy of `logits` with every token the grammar forbids next at -inf."""
        allowed = self.allowed()
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        n = min(self._n, logits.shape[0])  # ids past the grammar's vocabulary (padding) stay forbidden
        out[:n] = np.where(allowed[:n], logits[:n], np.float32(-np.inf))
        if not np.isfinite(out).any():
            raise ModelError("the constraint allows no token here")
        return out

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())
