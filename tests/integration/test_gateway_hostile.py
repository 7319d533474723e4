"""The gateway under hostile input (issue 18): what a LAN attacker or a careless client can
send it, and what a model file's chat template can make it do.

Real processes on loopback: a tiny real GGUF whose chat template is hostile (a 20,000 x
20,000 loop, range(10**9), a captured runaway loop, a billion-fold repeat, and a normal
branch), served by a real `edgemesh node` behind a real `edgemesh gateway`; raw sockets for
the slow and idle connections. Each test fails on the code before the fix: chat prompts
were rendered and tokenized on the event loop (a 4 MB body froze every client for ~2 s, the
loop for 11 s, range(10**9) was a 500), oversized bodies were a 400, no header deadline or
connection cap existed, a blank --api-key passed, capacity 429s were not counted and
/healthz said ok with no node.

The template budget itself (every way a template can loop or grow a value) is checked in
process, on the real sandbox, at the end of the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.config import Limits, Timeouts
from mesh.errors import InvalidInput
from mesh.tokenizer import ChatTemplate, TemplateBudget
from tests.conftest import Launcher, Proc, gateway_url, metric_lines
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

# One template, several traps, chosen by the last message; anything else is a plain chat.
HOSTILE_TEMPLATE = """
{%- set last = messages[-1]['content'] -%}
{%- if last == 'loop' -%}
  {%- for i in range(20000) -%}{%- for j in range(20000) -%}x{%- endfor -%}{%- endfor -%}
{%- elif last == 'range' -%}
  {{ range(10 ** 9) | length }}
{%- elif last == 'capture' -%}
  {%- set held -%}{%- for i in range(20000) -%}{%- for j in range(20000) -%}xy{%- endfor -%}{%- endfor -%}
  {%- endset -%}{{ held | length }}
{%- elif last == 'repeat' -%}
  {{ last * 10 ** 9 }}
{%- else -%}
  {%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}{%- endfor -%}<|assistant|>
{%- endif -%}
"""
BUDGET_S = Timeouts().template_render_s
MAX_POLL_S = 0.5  # the slowest /healthz answer allowed while the gateway works on a hostile request


def tiny_model_with_template(directory: Path, template: str) -> Path:
    """A tiny real GGUF (tests/fixtures/tiny_gguf.py) whose tokenizer.chat_template is `template`,
    rewritten with gguf's own metadata copier."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    directory.mkdir(parents=True, exist_ok=True)
    base = write_tiny_gguf(directory / "tiny-base.gguf", SPECS[0])
    reader = gguf.GGUFReader(base)
    out = directory / "tiny-hostile-template.gguf"
    writer = gguf.GGUFWriter(str(out), str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()))
    copy_with_new_metadata(reader, writer, {
        gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}, [])
    return out


def start_gateway(launcher: Launcher, name: str, model: Path, *extra: str,
                  env: dict[str, str] | None = None) -> Proc:
    return launcher.start(name, ["gateway", "--model", str(model), "--port", "0", "--no-discovery", *extra],
                          env=env)


def wait_until_serving(url: str, timeout_s: float = 90.0) -> None:
    """Until the gateway has a placement of the model (`ready` in /v1/models, on old code too)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["ready"]:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} has no placement after {timeout_s}s")


class Poller:
    """Another client: polls /healthz back to back and keeps the time of each answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = client.get(f"{self.url}/healthz").status_code
                    if status != 200:
                        self.failures.append(f"status {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.times.append(time.monotonic() - started)
                time.sleep(0.02)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def check(self) -> None:
        assert not self.failures, self.failures[:5]
        assert len(self.times) >= 5, self.times
        assert max(self.times) < MAX_POLL_S, f"slowest /healthz took {max(self.times):.2f}s"


def chat(url: str, content: str, **extra: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def rejected(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {key.split('reason="')[1].split('"')[0]: value
            for key, value in metric_lines(text, "edgemesh_rejected_total").items()}


# ------------------------------------------------------------------ a node + gateway on the hostile model

@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_with_template(tmp_path_factory.mktemp("hostile-model"), HOSTILE_TEMPLATE)


@pytest.fixture(scope="module")
def hostile_mesh(module_launcher: Launcher, hostile_model: Path) -> str:
    node = module_launcher.node("hostile-node", hostile_model)
    gateway = start_gateway(module_launcher, "hostile-gateway", hostile_model, "--peer", f"127.0.0.1:{node.ready[1]}")
    url = gateway_url(gateway)
    wait_until_serving(url)
    return url


@pytest.mark.slow
def test_a_4mb_chat_body_is_refused_with_413_and_never_freezes_other_clients(hostile_mesh: str) -> None:
    url = hostile_mesh
    limits = Limits()
    with Poller(url) as poller:
        time.sleep(0.3)
        # Past the body limit: 413, from the Content-Length, before a byte of the body is parsed.
        over = "y" * (limits.max_body_bytes + 300_000)
        started = time.monotonic()
        response = chat(url, over)
        assert response.status_code == 413, response.text[:300]
        assert "larger than" in response.json()["error"]["message"]
        assert time.monotonic() - started < 5

        # Under the body limit but 3.9 million characters of text: refused by the prompt limit
        # as soon as it is parsed (it used to be rendered and tokenized on the event loop).
        response = chat(url, "hello world " * 325_000)
        assert response.status_code == 400, response.text[:300]
        assert f"more than {limits.max_prompt_chars} characters" in response.json()["error"]["message"]

        # Within every limit: rendered and tokenized (most of a second), off the event loop,
        # then refused because it does not fit the context.
        response = chat(url, "hello world " * 80_000)
        assert response.status_code == 400, response.text[:300]
        assert "the context holds" in response.json()["error"]["message"], response.text[:300]
        time.sleep(0.3)
    poller.check()
    reasons = rejected(url)
    assert reasons.get("too_large", 0) >= 1 and reasons.get("invalid", 0) >= 2, reasons


@pytest.mark.slow
@pytest.mark.parametrize("trap", ["loop", "range", "capture", "repeat"])
def test_a_template_that_loops_or_overflows_is_refused_within_its_budget(hostile_mesh: str, trap: str) -> None:
    url = hostile_mesh
    with Poller(url) as poller:
        time.sleep(0.2)
        started = time.monotonic()
        response = chat(url, trap)
        took = time.monotonic() - started
        time.sleep(0.2)
    assert response.status_code == 400, response.text[:500]
    message = response.json()["error"]["message"]
    assert "chat template" in message and "budget" in message, message
    assert took < BUDGET_S + 2.0, f"refused after {took:.2f}s (budget {BUDGET_S}s)"
    poller.check()
    # The gateway goes on: the template's plain branch still answers.
    answer = chat(url, "Hello there")
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ------------------------------------------------------------------ a gateway with no node

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", SPECS[0])


HEADER_S = 2.0
BODY_S = 2.0


@pytest.fixture(scope="module")
def lonely_gateway(module_launcher: Launcher, tiny_model: Path) -> str:
    proc = start_gateway(module_launcher, "lonely-gateway", tiny_model,
                         env={"EDGEMESH_HTTP_HEADER_S": str(HEADER_S), "EDGEMESH_HTTP_BODY_S": str(BODY_S)})
    return gateway_url(proc)


@pytest.mark.slow
def test_healthz_is_503_with_a_reason_when_no_node_is_ready_and_livez_stays_ok(lonely_gateway: str) -> None:
    response = httpx.get(f"{lonely_gateway}/healthz", timeout=10)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "unavailable" and body["nodes_ready"] == 0 and body["placements"] == 0
    assert "no node" in body["reason"], body
    live = httpx.get(f"{lonely_gateway}/livez", timeout=10)
    assert live.status_code == 200 and live.json()["status"] == "ok"


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed the connection (non-blocking socket)."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.slow
def test_slow_sockets_dripping_header_bytes_are_closed_and_others_still_served(lonely_gateway: str) -> None:
    address = _address(lonely_gateway)
    socks: list[socket.socket] = []
    connected_at: list[float] = []  # each socket's own start: the gateway's deadline runs from its accept
    for _ in range(60):
        socks.append(socket.create_connection(address, timeout=5))
        connected_at.append(time.monotonic())
    try:
        for sock in socks:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n")
            sock.setblocking(False)
        opened = time.monotonic()
        closed_after: dict[int, float] = {}
        served: list[float] = []
        while len(closed_after) < len(socks) and time.monotonic() - opened < 4 * HEADER_S + 4:
            for i, sock in enumerate(socks):
                if i in closed_after:
                    continue
                try:
                    sock.send(b"X")  # one more byte of a header line that never ends
                except OSError:
                    closed_after[i] = time.monotonic() - opened
                    continue
                if _closed_by_peer(sock):
                    closed_after[i] = time.monotonic() - opened
            started = time.monotonic()
            assert httpx.get(f"{lonely_gateway}/v1/models", timeout=10).status_code == 200
            served.append(time.monotonic() - started)
            time.sleep(0.25)
        assert len(closed_after) == len(socks), f"{len(socks) - len(closed_after)} slow sockets still open"
        assert max(closed_after.values()) < HEADER_S + 2.0, sorted(closed_after.values())[-5:]
        # Not closed early: measured from each socket's own connection (a loaded machine can
        # take a while to open sixty).
        early = sorted(opened + after - connected_at[i] for i, after in closed_after.items())[:5]
        assert early[0] >= HEADER_S * 0.9, early
        assert max(served) < 2.0, served
    finally:
        for sock in socks:
            sock.close()
    assert httpx.get(f"{lonely_gateway}/v1/models", timeout=10).status_code == 200
    assert rejected(lonely_gateway).get("header_timeout", 0) >= len(socks)


@pytest.mark.slow
def test_a_body_that_never_finishes_gets_408(lonely_gateway: str) -> None:
    with socket.create_connection(_address(lonely_gateway), timeout=BODY_S + 10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")
        started = time.monotonic()
        sock.setblocking(False)
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() - started < BODY_S + 8:
            with contextlib.suppress(BlockingIOError):
                sock.send(b"a")
            with contextlib.suppress(BlockingIOError):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            time.sleep(0.2)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert took < BODY_S + 2.0, took


@pytest.mark.slow
def test_connections_past_the_cap_get_503_or_are_closed(launcher: Launcher, tiny_model: Path) -> None:
    cap = 20
    proc = start_gateway(launcher, "capped-gateway", tiny_model,
                         env={"EDGEMESH_MAX_HTTP_CONNECTIONS": str(cap), "EDGEMESH_HTTP_HEADER_S": "60"})
    url = gateway_url(proc)
    address = _address(url)
    idle = []
    try:
        for _ in range(cap + 25):
            sock = socket.create_connection(address, timeout=5)
            sock.setblocking(False)
            idle.append(sock)
        time.sleep(2.0)  # past the cap's short head deadline (1 s)
        still_open = [s for s in idle if not _closed_by_peer(s)]
        assert len(still_open) == cap, f"{len(still_open)} of {len(idle)} idle connections open (cap {cap})"
        try:
            status = httpx.get(f"{url}/v1/models", timeout=10).status_code
        except httpx.TransportError:
            status = 0  # closed: also a refusal
        assert status in (0, 503), status
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/v1/models", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the gateway did not serve again once the idle sockets left"
        time.sleep(0.1)
    assert rejected(url).get("connections", 0) >= 25


# ------------------------------------------------------------------ start-up and capacity

@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env", "padded"])
def test_a_blank_or_padded_api_key_is_refused_at_start(launcher: Launcher, tiny_model: Path, how: str) -> None:
    args = ["gateway", "--model", str(tiny_model), "--host", "0.0.0.0", "--port", "0", "--no-discovery"]
    env = {}
    if how == "flag":
        args += ["--api-key", " "]
    elif how == "env":
        env["EDGEMESH_API_KEY"] = "   "
    else:
        args += ["--api-key", " s3cret "]
    proc = launcher.start(f"blank-key-{how}", args, env=env, wait_ready=False)
    try:
        code = proc.popen.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.stop(signal.SIGKILL)
        raise AssertionError(f"the gateway started with a {how} API key on 0.0.0.0") from None
    log = proc.log()
    assert code == 2, log
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "api-key" in line]
    assert len(lines) == 1, log


@pytest.mark.slow
def test_capacity_refusals_are_counted_and_healthz_is_ok_with_a_node(launcher: Launcher, tiny_model: Path) -> None:
    node = launcher.node("full-node", tiny_model, "--slots", "1", "--max-queue", "0")
    gateway = start_gateway(launcher, "full-gateway", tiny_model, "--peer", f"127.0.0.1:{node.ready[1]}")
    url = gateway_url(gateway)
    wait_until_serving(url)
    health = httpx.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text

    # The node's one slot is taken by a request it cannot answer yet (the node is paused):
    # the next one is refused at once with 429, and counted.
    first: dict[str, Any] = {}
    os.kill(node.pid, signal.SIGSTOP)
    try:
        holder = threading.Thread(target=lambda: first.update(response=httpx.post(
            f"{url}/v1/completions", json={"prompt": "one", "max_tokens": 4}, timeout=60)), daemon=True)
        holder.start()
        time.sleep(1.0)
        second = httpx.post(f"{url}/v1/completions", json={"prompt": "two", "max_tokens": 4}, timeout=30)
        assert second.status_code == 429, second.text
        assert "capacity" in second.json()["error"]["message"]
    finally:
        os.kill(node.pid, signal.SIGCONT)
    holder.join(timeout=60)
    assert first["response"].status_code == 200, first["response"].text
    assert rejected(url).get("capacity", 0) == 1, rejected(url)


# ------------------------------------------------------------------ the template budget, in process

MESSAGES = [{"role": "user", "content": "hello"}]
SMALL = TemplateBudget(seconds=2.0, max_chars=100_000, max_steps=50_000)

OVER_BUDGET = {
    "nested loops": "{% for i in range(20000) %}{% for j in range(20000) %}x{% endfor %}{% endfor %}",
    "a huge range": "{% for i in range(10**9) %}{{ i }}{% endfor %}",
    "a repeated text": "{{ 'x' * 10**9 }}",
    "a text doubled in a loop": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "a text added to itself": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                              "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "a captured runaway loop": "{% set held %}{% for i in range(20000) %}{% for j in range(20000) %}x"
                               "{% endfor %}{% endfor %}{% endset %}{{ held | length }}",
    "unbounded recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "a wide center": "{{ 'x' | center(10**9) }}",
    "a wide ljust": "{{ 'x'.ljust(10**9) }}",
    "a wide format field": "{{ '{:>999999999}'.format(1) }}",
    "a wide printf field": "{{ '%0999999999d' % 1 }}",
    "a repeated format field": "{{ ('{0}' * 1000).format('x' * 1000) }}",
    "a list of references joined": "{{ (['x' * 1000] * 10000) | join }}",
    "a text joined with a long separator": "{{ ('x' * 10000) | join('y' * 100) }}",
    "a growing replace": "{{ ('x' * 10000) | replace('x', 'y' * 1000) }}",
    "an indent of every line": "{{ ('\\n' * 10000) | indent(1000) }}",
    "a huge power": "{{ 2 ** (10 ** 8) }}",
    "a sum of lists": "{{ ([[1]] * 1000) | sum(start=[]) }}",
    "a printed list of references": "{{ ['x' * 1000] * 1000 }}",
    "too much output": "{% for i in range(2000) %}{{ 'x' * 99 }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(OVER_BUDGET))
def test_the_template_budget_refuses_every_way_to_loop_or_grow(name: str) -> None:
    template = ChatTemplate(OVER_BUDGET[name], bos_token="<s>", eos_token="</s>", budget=SMALL)
    started = time.monotonic()
    with pytest.raises(InvalidInput, match="chat template") as refused:
        template.render(MESSAGES)
    assert time.monotonic() - started < SMALL.seconds + 0.5, name
    assert "budget" in str(refused.value) or "failed" in str(refused.value)


def test_the_time_budget_stops_a_slow_render() -> None:
    # Within the step budget, but each step slow (a long sort): the clock stops it.
    slow = ChatTemplate("{% for i in range(100000) %}{{ (messages[0].content * 2000) | list | sort | length }}"
                        "{% endfor %}", bos_token="", eos_token="",
                        budget=TemplateBudget(seconds=0.5, max_chars=4_000_000, max_steps=10**9))
    started = time.monotonic()
    with pytest.raises(InvalidInput, match=r"longer than 0.5 s"):
        slow.render(MESSAGES)
    assert time.monotonic() - started < 1.5


def test_range_of_a_billion_is_a_clear_refusal_not_a_crash() -> None:
    template = ChatTemplate("{{ range(10**9) | length }}", bos_token="", eos_token="")
    with pytest.raises(InvalidInput, match=r"range\(1000000000\)"):
        template.render(MESSAGES)


def test_ordinary_templates_render_as_before_under_the_budget() -> None:
    source = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m.content | trim }}{% endfor %}"
              "{{ '%s-%d' % ('a', 3) }}{{ 'b' ~ 'c' }}{{ messages | map(attribute='content') | join(',') }}"
              "{{ messages | tojson }}{{ 'x' | center(5) }}{{ range(3) | list }}{{ '{0}!'.format('hi') }}"
              "{% if add_generation_prompt %}{{ bos_token }}{% endif %}")
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    expected = ('<|user|>helloa-3bchello' + json.dumps(MESSAGES) + "  x  [0, 1, 2]hi!<s>")
    assert template.render(MESSAGES) == expected
    # A million characters of conversation is an ordinary (long) prompt, well within the budget.
    long = [{"role": "user", "content": "word " * 200_000}]
    assert len(template.render(long)) > 2_000_000


@pytest.fixture
def _no_env_tuning(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("EDGEMESH_HTTP") or name.startswith("EDGEMESH_TEMPLATE"):
            monkeypatch.delenv(name)
    yield


def test_timeouts_and_limits_are_tuned_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                           _no_env_tuning: None) -> None:
    from mesh.errors import ConfigError
    from mesh.settings import from_environment

    monkeypatch.setenv("EDGEMESH_HTTP_HEADER_S", "2.5")
    monkeypatch.setenv("EDGEMESH_MAX_HTTP_CONNECTIONS", "7")
    assert from_environment(Timeouts).http_header_s == 2.5
    assert from_environment(Limits).max_http_connections == 7
    for bad in ("abc", "0", "-1", "nan", "inf"):
        monkeypatch.setenv("EDGEMESH_HTTP_HEADER_S", bad)
        with pytest.raises(ConfigError, match="EDGEMESH_HTTP_HEADER_S"):
            from_environment(Timeouts)
    monkeypatch.setenv("EDGEMESH_MAX_HTTP_CONNECTIONS", "2.5")
    with pytest.raises(ConfigError, match="whole number"):
        from_environment(Limits)
