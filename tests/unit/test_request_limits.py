"""Request limits stated and enforced (issue 19, part 8): each refused with a 400 that names
what was too large, at one past the limit and not at the limit."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from mesh.config import Limits
from mesh.errors import InvalidInput
from mesh.gateway.schemas import MAX_STOP_STRINGS, ChatRequest, CompletionRequest, check_limits, parse

LIMITS = replace(Limits(), max_messages=5, max_stop_chars=10, max_prompt_chars=100)


def _chat(**extra: Any) -> ChatRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    request: ChatRequest = parse(ChatRequest, json.dumps(body).encode())
    return request


def test_most_messages() -> None:
    check_limits(_chat(messages=[{"role": "user", "content": "x"}] * 5), LIMITS)
    with pytest.raises(InvalidInput, match=r"^messages: 6 messages, more than the 5"):
        check_limits(_chat(messages=[{"role": "user", "content": "x"}] * 6), LIMITS)


def test_longest_stop_string_and_most_stop_strings() -> None:
    check_limits(_chat(stop="x" * 10), LIMITS)
    with pytest.raises(InvalidInput, match=r"^stop: a stop string of 11 characters"):
        check_limits(_chat(stop=["a", "x" * 11]), LIMITS)
    completion = parse(CompletionRequest, json.dumps({"prompt": "p", "stop": "y" * 11}).encode())
    with pytest.raises(InvalidInput, match=r"^stop: "):
        check_limits(completion, LIMITS)
    with pytest.raises(InvalidInput, match=f"at most {MAX_STOP_STRINGS} stop strings"):
        _chat(stop=["s"] * (MAX_STOP_STRINGS + 1))


def test_longest_prompt() -> None:
    check_limits(parse(CompletionRequest, json.dumps({"prompt": "p" * 100}).encode()), LIMITS)
    with pytest.raises(InvalidInput, match="prompt is longer than 100 characters"):
        check_limits(parse(CompletionRequest, json.dumps({"prompt": "p" * 101}).encode()), LIMITS)
    with pytest.raises(InvalidInput, match="more than 100 characters"):
        check_limits(_chat(messages=[{"role": "user", "content": "m" * 60}] * 2), LIMITS)
