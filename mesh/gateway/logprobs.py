"""Log-probabilities in OpenAI's shapes, for the tokens whose text the client is shown.

The node reports, per generated token, its log-probability and the top alternatives under
the model's raw logits (see mesh.sampling). The gateway decides which tokens a client sees:
a token is reported once some of its text is released to the client; tokens cut off by a
stop string, and the end-of-generation token, are never reported, so the logprobs match the
text. Chat gets `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`;
text completions get the legacy `{tokens, token_logprobs, top_logprobs, text_offset}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mesh.tokenizer import Tokenizer
from mesh.types import TokenEvent, TopLogprob

Kind = Literal["chat", "text"]


@dataclass(frozen=True)
class _Entry:
    event: TokenEvent
    offset: int  # characters of the answer before this token's text


class LogprobReport:
    """Collects one answer's token log-probabilities and hands out those the client can see."""

    def __init__(self, tokenizer: Tokenizer, kind: Kind, base_offset: int = 0) -> None:
        self._tokenizer = tokenizer
        self._kind = kind
        self._base = base_offset  # text completions count offsets from the start of the prompt
        self._held: list[_Entry] = []
        self._ready: list[_Entry] = []

    def add(self, event: TokenEvent, offset: int) -> None:
        """A generated token whose text starts at character `offset` of the answer."""
        self._held.append(_Entry(event, offset))

    def release(self, shown: int) -> None:
        """The first `shown` characters of the answer have been sent: their tokens are reported."""
        while self._held and self._held[0].offset < shown:
            self._ready.append(self._held.pop(0))

    def finish(self, cut_at: int | None) -> None:
        """Generation ended. `cut_at`: where a stop string cut the text (its tokens are dropped);
        None: all the text was sent, so every token held back is reported."""
        if cut_at is None:
            self._ready.extend(self._held)
        else:
            self.release(cut_at)
        self._held.clear()

    def take(self) -> dict[str, Any] | None:
        """The OpenAI-shaped logprobs of the tokens ready since the last call; None if none."""
        if not self._ready:
            return None
        entries, self._ready = self._ready, []
        return self._chat(entries) if self._kind == "chat" else self._text(entries)

    def _piece(self, token: int) -> tuple[str, list[int]]:
        raw = self._tokenizer.piece(token)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _alternative(self, top: TopLogprob) -> dict[str, Any]:
        text, raw = self._piece(top.token_id)
        return {"token": text, "logprob": top.logprob, "bytes": raw}

    def _chat(self, entries: list[_Entry]) -> dict[str, Any]:
        content = []
        for entry in entries:
            text, raw = self._piece(entry.event.token_id)
            content.append({"token": text, "logprob": entry.event.logprob, "bytes": raw,
                            "top_logprobs": [self._alternative(t) for t in entry.event.top_logprobs]})
        return {"content": content, "refusal": None}

    def _text(self, entries: list[_Entry]) -> dict[str, Any]:
        tops: list[dict[str, float]] = []
        for entry in entries:
            alternatives: dict[str, float] = {}
            for top in entry.event.top_logprobs:
                alternatives.setdefault(self._piece(top.token_id)[0], top.logprob)  # two ids, one text: the likelier
            tops.append(alternatives)
        return {"tokens": [self._piece(e.event.token_id)[0] for e in entries],
                "token_logprobs": [e.event.logprob for e in entries], "top_logprobs": tops,
                "text_offset": [self._base + e.offset for e in entries]}


def merge(kind: Kind, parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One answer's logprobs from those of its chunks (the mesh's, or the cloud's own)."""
    if not parts:
        return None
    if kind == "chat":
        return {"content": [item for part in parts for item in (part.get("content") or [])],
                "refusal": None}
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {key: [item for part in parts for item in (part.get(key) or [])] for key in keys}


def join(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """merge(), the kind read from the parts themselves (chat's have `content`)."""
    if not parts:
        return None
    return merge("chat" if "content" in parts[0] else "text", parts)


def empty(kind: Kind) -> dict[str, Any]:
    """What an answer that asked for logprobs gets when no token was shown."""
    if kind == "chat":
        return {"content": [], "refusal": None}
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
