"""An admin's policy on a real gateway (issue 17, part 5): a system prompt file, deny patterns
on prompts and on streamed answers, and a file of named API keys re-read while it serves.

Real processes on loopback: a node with the default model (SmolLM2, greedy answers known:
"What is the capital of France?" -> "The capital of France is Paris.", "Write a long story
about a dragon." -> "Once upon a time, ... a dragon named Erebo. ..." for 300 tokens and more, both
under this file's system prompt)
behind a gateway with every policy flag; a second gateway with the same policy in front of
a stand-in cloud (tests/fixtures/openai_standin.py); and start errors of bad policy files.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.tokenizer import Tokenizer
from tests.conftest import REPO, Launcher, gateway_url, metric_lines
from tests.fixtures.openai_standin import StandIn, answer_prefix, run_standin

pytestmark = pytest.mark.slow

SYSTEM_PROMPT = "You are the help desk of ACME. Answer in one short sentence."
# 1 and 2 stop answers (1 spans the tokens " France", " is", " Paris"); 3 matches only the
# admin's own system prompt; 4 refuses prompts. Numbered from 1 in flag order.
DENY = [r"france\s{1,3}is\s{1,3}paris", r"named\s?erebo", "help desk", "launch codes"]
KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def write_keys(path: Path, keys: dict[str, str], extra: str = "") -> None:
    """Replace the key file whole (as an editor saving it would), never readable by others."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# name key\n" + "".join(f"{n} {k}\n" for n, k in keys.items()) + extra)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def policy_flags(workdir: Path) -> list[str]:
    prompt = workdir / "system-prompt.txt"
    prompt.write_text(SYSTEM_PROMPT + "\n")
    flags = ["--system-prompt-file", str(prompt)]
    for pattern in DENY:
        flags += ["--deny-pattern", pattern]
    return flags


def ask(url: str, content: str, key: str = "alice", system: str | None = None, **extra: Any) -> httpx.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    body = {"messages": messages, "max_tokens": 60, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(key), timeout=60)


def stream_raw(url: str, content: str, key: str = "alice", **extra: Any) -> tuple[bytes, list[dict[str, Any]]]:
    """The streamed answer's raw bytes (what a client could ever see) and its JSON events."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 60, "temperature": 0,
            "stream": True, **extra}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=auth(key), timeout=60) as response:
        assert response.status_code == 200
        raw = response.read()
    lines = [line for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", raw[-300:]
    return raw, [json.loads(line[6:]) for line in lines[:-1]]


def streamed_text(events: list[dict[str, Any]]) -> tuple[str, str | None]:
    text, finish = "", None
    for event in events:
        assert "error" not in event, event
        if event.get("choices"):
            text += event["choices"][0]["delta"].get("content") or ""
            finish = event["choices"][0]["finish_reason"] or finish
    return text, finish


def wait_until_serving(url: str, timeout_s: float = 90.0) -> None:
    """Until the gateway has a placement of the model."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/models", headers=auth("alice"), timeout=5).json()["data"][0]["ready"]:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} has no placement after {timeout_s}s")


def metrics(url: str, name: str) -> dict[str, float]:
    return metric_lines(httpx.get(f"{url}/metrics", timeout=10).text, name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("policy")


@pytest.fixture(scope="module")
def mesh(module_launcher: Launcher, default_model: Path, workdir: Path) -> dict[str, Any]:
    node = module_launcher.node("policy-node", default_model, "--no-advertise")
    keys = workdir / "keys"
    write_keys(keys, KEYS)
    gateway = module_launcher.start("policy-gateway", [
        "gateway", "--model", str(default_model), "--port", "0", "--no-discovery",
        "--peer", f"127.0.0.1:{node.ready[1]}", "--api-keys-file", str(keys), *policy_flags(workdir)])
    url = gateway_url(gateway)
    wait_until_serving(url)
    return {"url": url, "keys": keys, "node_metrics": f"http://127.0.0.1:{node.ready[2]}/metrics",
            "gateway": gateway}


@pytest.fixture(scope="module")
def tokenizer(default_model: Path) -> Tokenizer:
    return Tokenizer.load(default_model)


def test_the_system_prompt_opens_every_chat_before_the_clients_own(mesh: dict[str, Any],
                                                                   tokenizer: Tokenizer) -> None:
    url = mesh["url"]
    user = {"role": "user", "content": "Say hello."}
    answer = ask(url, "Say hello.")
    assert answer.status_code == 200, answer.text  # rule 3 ("help desk") is in the admin's text only
    admin_first = len(tokenizer.encode_chat([{"role": "system", "content": SYSTEM_PROMPT}, user]))
    assert answer.json()["usage"]["prompt_tokens"] == admin_first
    assert admin_first != len(tokenizer.encode_chat([user]))  # SmolLM2's own default system prompt

    # A client's system message stays, after the admin's, in one system message.
    answer = ask(url, "Say hello.", system="Speak like a pirate.")
    assert answer.status_code == 200, answer.text
    joined = tokenizer.encode_chat([{"role": "system", "content": SYSTEM_PROMPT + "\n\nSpeak like a pirate."}, user])
    assert answer.json()["usage"]["prompt_tokens"] == len(joined)
    replaced = tokenizer.encode_chat([{"role": "system", "content": "Speak like a pirate."}, user])
    assert len(joined) > len(replaced)


def test_a_prompt_matching_a_deny_pattern_is_refused_by_rule_and_the_gateway_goes_on(
        mesh: dict[str, Any]) -> None:
    url = mesh["url"]
    before = metrics(url, "edgemesh_gateway_policy_blocks_total")
    refused = ask(url, "Please print the LAUNCH CODES of the base.")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "content_policy" and error["type"] == "invalid_request_error"
    assert "rule 4" in error["message"] and "launch" not in error["message"].lower()
    after = metrics(url, "edgemesh_gateway_policy_blocks_total")
    key = 'edgemesh_gateway_policy_blocks_total{rule="4",where="prompt"}'
    assert after[key] - before.get(key, 0) == 1
    assert metrics(url, "edgemesh_rejected_total").get('edgemesh_rejected_total{reason="content_policy"}', 0) >= 1
    assert ask(url, "Say hello.").status_code == 200


def test_an_answer_that_would_match_stops_with_content_filter_and_never_sends_the_text(
        mesh: dict[str, Any]) -> None:
    url = mesh["url"]
    question = "What is the capital of France?"
    whole = ask(url, question)
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    # Greedy: "The capital of France is Paris." is cut where the match starts.
    assert choice["message"]["content"] == "The capital of " and choice["finish_reason"] == "content_filter"

    raw, events = stream_raw(url, question)
    text, finish = streamed_text(events)
    assert text == "The capital of " and finish == "content_filter"
    assert b"France" not in raw and b"Paris" not in raw
    blocks = metrics(url, "edgemesh_gateway_policy_blocks_total")
    assert blocks['edgemesh_gateway_policy_blocks_total{rule="1",where="answer"}'] >= 2

    # Nor through logprobs: only tokens whose text was wholly sent are reported.
    shown = ask(url, question, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert "".join(entry["token"] for entry in shown) == "The capital of"
    raw, events = stream_raw(url, question, logprobs=True)
    assert b"France" not in raw and b"Paris" not in raw
    assert [e["token"] for ev in events if ev.get("choices") and ev["choices"][0].get("logprobs")
            for e in ev["choices"][0]["logprobs"]["content"]] == [entry["token"] for entry in shown]


def test_a_stopped_answer_ends_its_generation_on_the_node(mesh: dict[str, Any]) -> None:
    url = mesh["url"]

    def node_tokens() -> float:
        text = httpx.get(mesh["node_metrics"], timeout=10).text
        return metric_lines(text, "edgemesh_node_tokens_generated_total")["edgemesh_node_tokens_generated_total"]

    before = node_tokens()
    # The greedy story runs past 300 tokens; "named Erebo" comes within its first 25.
    answer = ask(url, "Write a long story about a dragon.", max_tokens=300)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter", choice
    assert choice["message"]["content"] == "Once upon a time, in a land far, far away, there was a dragon "
    assert answer.json()["usage"]["completion_tokens"] < 40
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        view = httpx.get(f"{url}/api/cluster", headers=auth("alice"), timeout=10).json()
        if all(n["in_flight"] == 0 for n in view["nodes"]):
            break
        time.sleep(0.05)
    assert all(n["in_flight"] == 0 for n in view["nodes"]), view["nodes"]
    generated = node_tokens() - before
    assert generated < 150, f"the node went on to generate {generated} of the 300 tokens asked for"


def test_raw_completions_are_refused_while_a_system_prompt_is_set(mesh: dict[str, Any]) -> None:
    response = httpx.post(f"{mesh['url']}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4},
                          headers=auth("alice"), timeout=30)
    assert response.status_code == 403, response.text
    assert "/v1/chat/completions" in response.json()["error"]["message"]


def test_the_ollama_and_embeddings_routes_are_under_the_same_policy(mesh: dict[str, Any],
                                                                     tokenizer: Tokenizer) -> None:
    url = mesh["url"]
    user = {"role": "user", "content": "Say hello."}
    chat = httpx.post(f"{url}/api/chat", headers=auth("alice"), timeout=60,
                      json={"model": "default", "messages": [user], "stream": False, "options": {"num_predict": 4}})
    assert chat.status_code == 200, chat.text
    admin_first = len(tokenizer.encode_chat([{"role": "system", "content": SYSTEM_PROMPT}, user]))
    assert chat.json()["prompt_eval_count"] == admin_first  # the admin's system prompt opened it
    denied = {"model": "default", "messages": [{"role": "user", "content": "the LAUNCH CODES please"}]}
    refused = httpx.post(f"{url}/api/chat", json=denied, headers=auth("alice"), timeout=30)
    assert refused.status_code == 400 and "rule 4" in refused.json()["error"], refused.text
    raw = httpx.post(f"{url}/api/generate", json={"model": "default", "prompt": "Once", "raw": True},
                     headers=auth("alice"), timeout=30)
    assert raw.status_code == 403, raw.text
    embed = httpx.post(f"{url}/v1/embeddings", json={"input": ["fine", "LAUNCH CODES"]}, headers=auth("alice"),
                       timeout=30)
    assert embed.status_code == 400 and "rule 4" in embed.json()["error"]["message"], embed.text


def test_named_keys_count_per_key_and_a_changed_key_file_applies_without_restart(
        mesh: dict[str, Any]) -> None:
    url, keys = mesh["url"], mesh["keys"]
    before_requests = metrics(url, "edgemesh_gateway_requests_by_key_total")
    before_tokens = metrics(url, "edgemesh_gateway_tokens_by_key_total")
    used = {"alice": {"prompt": 0, "completion": 0}, "bob": {"prompt": 0, "completion": 0}}
    for name in ("alice", "bob", "bob"):
        answer = ask(url, "Name three colors.", key=name)
        assert answer.status_code == 200, answer.text
        for kind in ("prompt", "completion"):
            used[name][kind] += answer.json()["usage"][f"{kind}_tokens"]
    for headers in ({"Authorization": "Bearer wrong-key"}, {}):
        refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                             headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text
    after_requests = metrics(url, "edgemesh_gateway_requests_by_key_total")
    after_tokens = metrics(url, "edgemesh_gateway_tokens_by_key_total")
    for name, count in (("alice", 1), ("bob", 2)):
        series = f'edgemesh_gateway_requests_by_key_total{{key_name="{name}"}}'
        assert after_requests[series] - before_requests.get(series, 0) == count
        for kind in ("prompt", "completion"):
            series = f'edgemesh_gateway_tokens_by_key_total{{key_name="{name}",kind="{kind}"}}'
            assert after_tokens[series] - before_tokens.get(series, 0) == used[name][kind] > 0
    exported = httpx.get(f"{url}/metrics", timeout=10).text
    assert all(key not in exported for key in KEYS.values())

    # bob removed, carol added: in force within about a second, no restart.
    carol = "carol-key-0123456789"
    write_keys(keys, {"alice": KEYS["alice"], "carol": carol})
    time.sleep(1.2)
    assert ask(url, "Say hello.", key="bob").status_code == 401
    answer = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 8}, headers={"Authorization": f"Bearer {carol}"}, timeout=30)
    assert answer.status_code == 200, answer.text

    # A malformed file leaves the last good keys in force, logged and counted.
    write_keys(keys, {"alice": KEYS["alice"]}, extra="dave\n")
    time.sleep(1.2)
    assert ask(url, "Say hello.", key="alice").status_code == 200
    again = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": 8}, headers={"Authorization": f"Bearer {carol}"}, timeout=30)
    assert again.status_code == 200, again.text
    assert metrics(url, "edgemesh_gateway_api_keys_reload_errors_total")[
        "edgemesh_gateway_api_keys_reload_errors_total"] == 1
    assert "line 3" in mesh["gateway"].log()  # the comment is line 1
    write_keys(keys, KEYS)
    time.sleep(1.2)
    assert ask(url, "Say hello.", key="bob").status_code == 200


# ------------------------------------------------------------------ the cloud path


@pytest.fixture(scope="module")
def cloud() -> Iterator[StandIn]:
    with run_standin() as standin:
        yield standin


def test_the_cloud_gets_the_system_prompt_and_its_answer_is_filtered_too(
        launcher: Launcher, default_model: Path, workdir: Path, cloud: StandIn) -> None:
    # No node at all: cloud-first sends every chat to the stand-in.
    gateway = launcher.start("policy-cloud-gateway", [
        "gateway", "--model", str(default_model), "--port", "0", "--no-discovery", "--policy", "cloud-first",
        "--cloud-url", cloud.url, *policy_flags(workdir), "--deny-pattern", r"office\s?assistant"])
    url = gateway_url(gateway)
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_tokens": 60}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200 and answer.headers["x-edgemesh-route"] == "cloud", answer.text
    assert cloud.last.body["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                           {"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}]
    # The stand-in's answer: "The cloud says: EdgeMesh keeps the office assistant answering ...",
    # one word per chunk, so the match spans two chunks (rule 5, after this file's four).
    choice = answer.json()["choices"][0]
    assert choice["message"]["content"] == answer_prefix(6) + " " and choice["finish_reason"] == "content_filter"
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
        raw = response.read()
    assert b"office" not in raw and b'"finish_reason": "content_filter"' in raw
    blocks = metrics(url, "edgemesh_gateway_policy_blocks_total")
    assert blocks['edgemesh_gateway_policy_blocks_total{rule="5",where="answer"}'] == 2


# ------------------------------------------------------------------ start errors


def start_error(workdir: Path, *flags: str) -> str:
    """The one error line of a gateway that must refuse to start."""
    done = subprocess.run([sys.executable, "-m", "mesh.cli", "gateway", "--model", "default", "--port", "0",
                           "--no-discovery", *flags], capture_output=True, text=True, timeout=120, cwd=REPO,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


def test_bad_policy_files_and_patterns_are_start_errors_that_name_the_fault(workdir: Path) -> None:
    keys = workdir / "bad-keys"
    keys.write_text("alice alice-key-1\n# a comment\nbob\n")
    os.chmod(keys, 0o600)
    assert f"{keys} line 3: expected 'NAME KEY'" in start_error(workdir, "--api-keys-file", str(keys))
    line = start_error(workdir, "--deny-pattern", "fine", "--deny-pattern", "unclosed(")
    assert "--deny-pattern 2 ('unclosed(')" in line and "not a valid regular expression" in line
    missing = workdir / "no-such-prompt.txt"
    assert f"--system-prompt-file {missing}: cannot read it" in start_error(
        workdir, "--system-prompt-file", str(missing))
