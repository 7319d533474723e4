"""The official `openai` client against a real gateway and node (issue 19, part 1): what it
asks for is served, and what EdgeMesh does not do yet is refused with a 400 naming the
field, instead of being silently ignored (logprobs used to come back None, penalties and
tools had no effect; structured output and tools are served now, see test_constrained.py)."""

from __future__ import annotations

from pathlib import Path

import httpx
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
    # (logprobs, penalties and logit_bias are served now: tests/integration/test_logprobs_penalties.py;
    # response_format and tools: tests/integration/test_constrained.py)
    asks = [
        ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),  # above OpenAI's 20
        ("logit_bias", {"logit_bias": {"49152": -100}}),  # just outside the vocabulary
        ("functions", {"functions": [{"name": "now", "parameters": {"type": "object"}}]}),  # deprecated: `tools`
    ]
    for field, extra in asks:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=4, **extra)
        assert field in refused.value.message, (field, refused.value.message)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="default", prompt="The sky is", max_tokens=4, echo=True)
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


def test_model_aliases_and_cors_origins(launcher: Launcher, default_model: Path) -> None:
    launcher.node("replica", default_model, "--role", "replica")
    plain = gateway_url(launcher.gateway("plain", default_model))
    url = gateway_url(launcher.gateway("web", default_model, "--model-alias", "gpt-4o-mini=default",
                                       "--cors-origin", "http://localhost:3000", "--api-key", "k-web"))
    wait_for_nodes(url, 1, headers={"Authorization": "Bearer k-web"})
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k-web", max_retries=0, timeout=120)

    # A client that hard-codes a model name is served under the alias; another name is a 404.
    served = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=4, temperature=0)
    assert served.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="'gpt-4o-mini'"):
        client.chat.completions.create(model="gpt-5", messages=MESSAGES, max_tokens=4)
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {default_model.stem, "gpt-4o-mini"}
    assert listed["gpt-4o-mini"].alias_of == default_model.stem

    # A browser page of the named origin may call the API: its preflight needs no key ...
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{url}/v1/chat/completions", headers=preflight, timeout=10)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    listing = httpx.get(f"{url}/v1/models", headers={"Origin": "http://localhost:3000",
                                                     "Authorization": "Bearer k-web"}, timeout=10)
    assert listing.headers["access-control-allow-origin"] == "http://localhost:3000"
    # ... but the request itself still does, and other origins (or a gateway without the flag) get no CORS.
    assert httpx.get(f"{url}/v1/models", headers={"Origin": "http://localhost:3000"}, timeout=10).status_code == 401
    other = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"},
                          timeout=10)
    assert "access-control-allow-origin" not in other.headers
    for response in (httpx.options(f"{plain}/v1/chat/completions", headers=preflight, timeout=10),
                     httpx.get(f"{plain}/v1/models", headers={"Origin": "http://localhost:3000"}, timeout=10)):
        assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--model-alias", "gpt-4o-mini", "is not NAME=MODEL"),
    ("--model-alias", "gpt-4o-mini=llama-3-70b", "this gateway serves"),
    ("--cors-origin", "http://localhost:3000/", "is not an origin"),
])
def test_a_bad_alias_or_origin_is_a_start_error(launcher: Launcher, default_model: Path, flag: str, value: str,
                                                says: str) -> None:
    gateway = launcher.start("bad", ["gateway", "--model", str(default_model), "--port", "0", flag, value],
                             wait_ready=False)
    assert gateway.popen.wait(timeout=60) == 2
    assert says in gateway.log() and "Traceback" not in gateway.log()
