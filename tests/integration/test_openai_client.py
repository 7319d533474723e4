"""The official `openai` client against a real gateway and node (issue 19, part 1): what it
asks for is served, and what EdgeMesh does not do yet is refused with a 400 naming the
field, instead of being silently ignored (logprobs used to come back None, penalties and
tools had no effect)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.conftest import Launcher, gateway_url, wait_for_nodes

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_the_official_client_is_served_or_told_no_by_name(launcher: Launcher, default_model: Path) -> None:
    launcher.node("replica", default_model, "--role", "replica")
    url = gateway_url(launcher.gateway("gw", default_model))
    wait_for_nodes(url, 1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)

    # Served: the defaults of fields EdgeMesh does not implement, and informational fields.
    chat = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=6, temperature=0,
                                          presence_penalty=0, frequency_penalty=0, tools=[], user="alice",
                                          metadata={"team": "ops"}, response_format={"type": "text"})
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens >= 1
    text = client.completions.create(model="default", prompt="The sky is", max_tokens=4, temperature=0,
                                     best_of=1, logprobs=0)
    assert text.choices[0].text

    # Refused, naming the field: each asks for something the answer would not have honoured.
    asks = [
        ("presence_penalty", {"presence_penalty": 2.0}),
        ("frequency_penalty", {"frequency_penalty": 2.0}),
        ("logprobs", {"logprobs": True, "top_logprobs": 2}),
        ("response_format", {"response_format": {"type": "json_object"}}),
        ("tools", {"tools": [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]}),
        ("logit_bias", {"logit_bias": {"50256": -100}}),
    ]
    for field, extra in asks:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, **extra)
        assert field in refused.value.message, (field, refused.value.message)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="default", prompt="The sky is", max_tokens=4, logprobs=2)
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4,
                                       extra_body={"mirostat": 2})

    # Request limits (Limits.max_messages, Limits.max_stop_chars): a 400 naming what was too large.
    with pytest.raises(openai.BadRequestError, match="messages: 4097 messages"):
        client.chat.completions.create(model="default", messages=MESSAGES * 4097, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="stop: a stop string of 513 characters"):
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, stop=["x" * 513])

    # And it went on serving.
    again = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == chat.choices[0].message.content
