"""The two OpenAI completion shapes, chat and text: how a piece of answer text is wrapped.

Their own module because the completion flow (completions.py) and the tool-call shaping
that rewraps a flavor (tool_calls.py) both need them, and completions imports tool_calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flavor:
    """What distinguishes chat from text completions."""

    object_name: str
    chunk_object: str
    wrap_text: Callable[[str], dict[str, Any]]  # a full answer's choice body
    wrap_delta: Callable[[str], dict[str, Any]]  # a streamed chunk's choice body
    first_delta: dict[str, Any] | None  # chat announces the role first


CHAT = Flavor("chat.completion", "chat.completion.chunk",
              lambda text: {"message": {"role": "assistant", "content": text}},
              lambda text: {"delta": {"content": text}},
              {"delta": {"role": "assistant", "content": ""}})
TEXT = Flavor("text_completion", "text_completion",
              lambda text: {"text": text, "logprobs": None},
              lambda text: {"text": text, "logprobs": None},
              None)
