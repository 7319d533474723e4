"""A model file whose chat template is code (issue 17), as a user meets it: real `python -m
mesh.cli gateway|node` processes given a tiny real GGUF (tests/fixtures/tiny_gguf.py) whose
tokenizer.chat_template is a CVE-2024-34359-style payload (it runs `touch canary` when
rendered without Jinja's sandbox) or a compile-time bomb (llama-cpp-python's Llama() would fold
it into 10 GB while compiling it) each stop at start with one error line naming the problem,
and the canary never appears. A template over the size bound stops the gateway too, and a
plain template still serves a chat through a replica node."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Launcher, gateway_url
from tests.fixtures.tiny_gguf import SPECS, cve_2024_34359_template, write_tiny_gguf
from tests.integration.test_gateway_hostile import chat, start_gateway, wait_until_serving
from tests.integration.test_startup_errors import NODE, assert_one_line_error, run_cli

GATEWAY = ("gateway", "--port", "0", "--no-discovery")
BOMB = "{%- for m in messages %}{{ m.content }}{% endfor %}\n{{ 'x' * 10**10 }}"


def model_with_template(directory: Path, template: str) -> Path:
    return write_tiny_gguf(directory / "chat.gguf", SPECS[0], chat_templates={"tokenizer.chat_template": template})


@pytest.mark.parametrize("process", ["gateway", "node"])
def test_a_cve_2024_34359_template_stops_the_process_and_runs_nothing(tmp_path: Path, process: str) -> None:
    canary = tmp_path / "canary"
    model = model_with_template(tmp_path, cve_2024_34359_template(canary))
    args = GATEWAY if process == "gateway" else NODE
    done = run_cli(*args, "--model", str(model), timeout=90)
    assert_one_line_error(done, "tokenizer.chat_template of chat.gguf is refused", "line 3",
                          "attribute '__class__'")
    assert not canary.exists()


@pytest.mark.parametrize("process", ["gateway", "node"])
def test_a_compile_time_bomb_stops_the_process_before_llama_cpp_compiles_it(tmp_path: Path, process: str) -> None:
    model = model_with_template(tmp_path, BOMB)
    args = GATEWAY if process == "gateway" else NODE
    started = time.monotonic()
    done = run_cli(*args, "--model", str(model), timeout=90)
    assert_one_line_error(done, "line 2", "folded")
    # Llama() would have spent tens of seconds and 10 GB on the fold, if it came to that.
    assert time.monotonic() - started < 30


def test_a_template_over_the_size_bound_stops_the_gateway(tmp_path: Path) -> None:
    model = model_with_template(tmp_path, "{{ bos_token }}" + "{# padding #}" * 100)
    done = run_cli(*GATEWAY, "--model", str(model), env={"EDGEMESH_TEMPLATE_MAX_SOURCE_BYTES": "1000"})
    assert_one_line_error(done, "tokenizer.chat_template is refused", "1315 bytes long, more than 1000")


@pytest.mark.slow
def test_a_plain_template_still_serves_chats_through_a_replica(launcher: Launcher, tmp_path: Path) -> None:
    template = ("{%- for m in messages %}<|endoftext|>{{ m.role }}\n{{ m.content | trim }}\n{% endfor -%}"
                "{%- if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
    model = model_with_template(tmp_path, template)
    node = launcher.node("replica", model, "--role", "replica")
    gateway = start_gateway(launcher, "gateway", model, "--peer", f"127.0.0.1:{node.ready[1]}")
    url = gateway_url(gateway)
    wait_until_serving(url)
    answer = chat(url, "Hello there")
    assert answer.status_code == 200, answer.text[:500]
    assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
