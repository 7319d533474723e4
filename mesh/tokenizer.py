"""Text <-> tokens for the scheduler: llama.cpp's own tokenizer (vocabulary-only load),
the GGUF's chat template rendered in a sandboxed Jinja environment, and incremental
detokenization with stop strings.

The prompt is built exactly as llama-cpp-python builds it, so the mesh and llama.cpp
see the same token ids: completions get BOS (when the model asks for it) and the text
tokenized with special tokens parsed; chats render the template with the model's BOS
and EOS strings and tokenize without adding BOS.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mesh.errors import InvalidInput, ModelError

_PIECE_BUFFER = 256


class _IgnoreGenerationTag(jinja2.ext.Extension):
    """HF chat templates may mark assistant turns with {% generation %}; it only matters for training."""

    tags = {"generation"}  # noqa: RUF012 - jinja2 declares it as a plain attribute

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise InvalidInput(f"chat template refused the conversation: {message}")


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str
    eos_token: str

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
            extensions=[_IgnoreGenerationTag, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        try:
            template = env.from_string(self.source)
            return template.render(
                messages=list(messages), bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=True, raise_exception=_raise,
                strftime_now=lambda fmt: datetime.now().strftime(fmt),
            )
        except InvalidInput:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"chat template failed to render: {exc}") from exc


class Tokenizer:
    """One model's vocabulary. Thread-safe for reads; loading is the only slow part."""

    def __init__(self, llm: Any) -> None:
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
        template = metadata.get("tokenizer.chat_template")
        self.chat_template = None if not template else ChatTemplate(
            source=template,
            bos_token=self._special_text(self.bos_id),
            eos_token=self._special_text(self.eos_id),
        )

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        from llama_cpp import Llama

        try:
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        except (ValueError, OSError) as exc:
            raise ModelError(f"llama.cpp could not read the vocabulary of {path}: {exc}") from exc
        return cls(llm)

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

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of answer text already sent (by a cloud that then failed), to append to the
        prompt so the mesh continues it. Plain text: markup in it is not special here."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else []

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
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
