"""Request validation: wrong types are refused (not coerced), each with a message naming the field."""

from __future__ import annotations

import json

import pytest

from mesh.errors import InvalidInput
from mesh.gateway.schemas import ChatRequest, CompletionRequest, parse


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_good_chat_request() -> None:
    req = parse(ChatRequest, body(messages=[{"role": "developer", "content": "be brief"},
                                            {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                  max_tokens=5, temperature=0, stop="\n", seed=3, user="ignored"))
    assert req.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert req.token_limit() == 5 and req.stop_strings() == ["\n"]
    assert req.sampling().greedy and req.sampling().seed == 3


def test_unseeded_requests_each_get_their_own_seed() -> None:
    seeds = {parse(CompletionRequest, body(prompt="x")).sampling().seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("raw,field", [
    (b"", "empty"),
    (body(messages=[]), "messages"),
    (body(messages="hi"), "messages"),
    (body(messages=[{"role": "user", "content": "hi"}], max_tokens=0), "max_tokens"),
    (body(messages=[{"role": "user", "content": "hi"}], max_tokens="5"), "max_tokens"),
    (body(messages=[{"role": "user", "content": "hi"}], temperature=3), "temperature"),
    (body(messages=[{"role": "user", "content": "hi"}], stop=["a"] * 9), "stop"),
    (body(messages=[{"role": "user", "content": "hi"}], n=2), "n"),
    (body(messages=[{"role": "robot", "content": "hi"}]), "role"),
    (b"[1, 2]", "body"),
    (b"{\"messages\": ", "JSON"),
])
def test_bad_chat_requests(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        parse(ChatRequest, raw)
    assert field.lower() in str(raised.value).lower()


@pytest.mark.parametrize("fields,fragment", [
    ({"prompt": ["a", "b"]}, "one prompt"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "suffix": "z"}, "suffix"),
    ({"prompt": 3}, "prompt"),
])
def test_bad_completion_requests(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        parse(CompletionRequest, json.dumps(fields).encode())
