"""logprobs, top_logprobs, penalties and logit_bias through the official `openai` client, on a
replica and on a 3-stage pipeline (issue 19, parts 2 and 3): the log-probabilities equal
llama.cpp's log-softmax of the same logits within 1e-4, streamed and not, chat and
completions; the penalties and logit_bias change greedy output; a penalised seeded stream
is the same after a stage is killed mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest

from mesh.transport.auth import sign
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.transport.generated import edgemesh_pb2_grpc
from tests.conftest import Launcher, gateway_url, wait_for_nodes, wait_for_pipeline
from tests.fixtures.node_wire import node_channel

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
TOLERANCE = 1e-4
MESHES = {"replica": ["--strategy", "replica", "--nodes", "1"],
          # four nodes for three stages: the spare takes a killed stage's layers (the failover case)
          "pipeline": ["--strategy", "pipeline", "--nodes", "4", "--stages", "3"]}


@pytest.fixture(scope="module", params=sorted(MESHES))
def mesh(request: pytest.FixtureRequest, module_launcher: Launcher, default_model: Path) -> Iterator[tuple[str, str]]:
    kind = request.param
    proc = module_launcher.start(f"up-{kind}", ["up", "--port", "0", "--threads", "1", "--model", str(default_model),
                                                "--cluster-key", module_launcher.cluster_key, *MESHES[kind]])
    url = gateway_url(proc)
    if kind == "pipeline":
        wait_for_pipeline(url, 3)
    else:
        wait_for_nodes(url, 1)
    yield url, kind
    proc.stop()


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=180)


def greedy_reference(llm: Any, prompt_ids: list[int], n: int) -> list[tuple[int, np.ndarray]]:
    """llama.cpp itself: each greedy token and the float64 log-softmax of the logits it came from."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last evaluated token's logits
        row = np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).astype(np.float64)
        logprobs = row - row.max() - np.log(np.exp(row - row.max()).sum())
        token = int(np.argmax(row))
        out.append((token, logprobs))
        llm.eval([token])
    return out


def top_ids(logprobs: np.ndarray, n: int) -> list[int]:
    order = np.lexsort((np.arange(logprobs.shape[0]), -logprobs))
    return [int(t) for t in order[:n]]


def chat_prompt_ids(llm: Any) -> list[int]:
    llm.reset()
    llm.create_chat_completion(messages=MESSAGES, max_tokens=1, temperature=0)
    return [int(t) for t in llm.input_ids[:llm.n_tokens]]  # the one sampled token is not evaluated


def check_chat(content: list[Any], reference: list[tuple[int, np.ndarray]], llm: Any, n_top: int) -> None:
    assert len(content) == len(reference)
    for entry, (token, logprobs) in zip(content, reference, strict=True):
        piece = llm.detokenize([token])
        assert bytes(entry.bytes) == piece and entry.token == piece.decode("utf-8", errors="replace")
        assert abs(entry.logprob - logprobs[token]) < TOLERANCE
        expected = top_ids(logprobs, n_top)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [llm.detokenize([t]) for t in expected]
        for got, want in zip(entry.top_logprobs, expected, strict=True):
            assert abs(got.logprob - logprobs[want]) < TOLERANCE


def check_text(logprobs: Any, reference: list[tuple[int, np.ndarray]], llm: Any, n_top: int, text: str) -> None:
    assert len(logprobs.tokens) == len(reference)
    offset = len(PROMPT)  # OpenAI counts text_offset from the start of the prompt
    for i, (token, row) in enumerate(reference):
        piece = llm.detokenize([token]).decode("utf-8", errors="replace")
        assert logprobs.tokens[i] == piece and logprobs.text_offset[i] == offset
        offset += len(piece)
        assert abs(logprobs.token_logprobs[i] - row[token]) < TOLERANCE
        expected = {llm.detokenize([t]).decode("utf-8", errors="replace"): row[t] for t in top_ids(row, n_top)}
        assert set(logprobs.top_logprobs[i]) == set(expected)
        for key, value in expected.items():
            assert abs(logprobs.top_logprobs[i][key] - value) < TOLERANCE
    assert "".join(logprobs.tokens) == text


def test_logprobs_equal_llama_cpp_streamed_and_not(mesh: tuple[str, str], reference_llm: Any) -> None:
    url, _ = mesh
    client = client_of(url)
    n = 8

    # Completions: logprobs = N alternatives.
    prompt_ids = reference_llm.tokenize(PROMPT.encode())
    reference = greedy_reference(reference_llm, prompt_ids, n)
    whole = client.completions.create(model="default", prompt=PROMPT, max_tokens=n, temperature=0, logprobs=3)
    check_text(whole.choices[0].logprobs, reference, reference_llm, 3, whole.choices[0].text)
    tokens: list[str] = []
    offsets: list[int] = []
    streamed_text = ""
    for chunk in client.completions.create(model="default", prompt=PROMPT, max_tokens=n, temperature=0,
                                           logprobs=3, stream=True):
        choice = chunk.choices[0]
        streamed_text += choice.text
        if choice.logprobs is not None:
            assert "".join(choice.logprobs.tokens) == choice.text  # each chunk carries its own tokens
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
    assert streamed_text == whole.choices[0].text
    assert tokens == whole.choices[0].logprobs.tokens and offsets == whole.choices[0].logprobs.text_offset

    # Chat: logprobs true, top_logprobs N.
    chat_ids = chat_prompt_ids(reference_llm)
    reference = greedy_reference(reference_llm, chat_ids, n)
    chat = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=n, temperature=0,
                                          logprobs=True, top_logprobs=2)
    assert chat.usage is not None and chat.usage.prompt_tokens == len(chat_ids)
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    check_chat(chat.choices[0].logprobs.content, reference, reference_llm, 2)
    content: list[Any] = []
    for chunk in client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=n, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            content += chunk.choices[0].logprobs.content or []
    check_chat(content, reference, reference_llm, 2)

    # logprobs alone: the chosen tokens' own, no alternatives.
    plain = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=3, temperature=0,
                                           logprobs=True)
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.content is not None
    assert [e.top_logprobs for e in plain.choices[0].logprobs.content] == [[], [], []]


def test_tokens_cut_by_a_stop_string_are_not_reported(mesh: tuple[str, str]) -> None:
    url, _ = mesh
    client = client_of(url)
    free = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
    text = free.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.completions.create(model="default", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
                                    stop=[stop])
    shown = cut.choices[0].text
    assert cut.choices[0].finish_reason == "stop" and shown == text[:text.index(stop)]
    reported = cut.choices[0].logprobs.tokens
    # only the tokens whose text is (at least partly) shown
    assert 0 < len(reported) < len(free.choices[0].logprobs.tokens)
    assert "".join(reported).startswith(shown) and len("".join(reported[:-1])) < len(shown)
    assert reported == free.choices[0].logprobs.tokens[:len(reported)]


def test_penalties_and_logit_bias_change_greedy_output(mesh: tuple[str, str], reference_llm: Any) -> None:
    url, _ = mesh
    client = client_of(url)
    body = {"model": "default", "prompt": "one, two, one, two, one, two,", "max_tokens": 16, "temperature": 0}
    plain = client.completions.create(**body).choices[0].text
    penalised = client.completions.create(**body, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalised != plain
    assert client.completions.create(**body, frequency_penalty=2.0,
                                     presence_penalty=2.0).choices[0].text == penalised  # still deterministic

    # logit_bias: -100 bans the greedy first token, +100 forces another one.
    first = reference_llm.tokenize(plain.encode(), add_bos=False)[0]
    banned = client.completions.create(**body, logit_bias={str(first): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != reference_llm.detokenize([first]).decode()
    forced_id = reference_llm.tokenize(b" banana", add_bos=False)[0]
    forced = client.completions.create(**{**body, "max_tokens": 3}, logit_bias={str(forced_id): 100})
    piece = reference_llm.detokenize([forced_id]).decode()
    assert forced.choices[0].text == piece * 3

    with pytest.raises(openai.BadRequestError, match="logit_bias: token id 999999 is outside"):
        client.completions.create(**body, logit_bias={"999999": 1})
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2, top_logprobs=2)


def test_the_node_refuses_what_the_sampler_cannot_honour(mesh: tuple[str, str], module_launcher: Launcher,
                                                         reference_llm: Any) -> None:
    """Straight to the node that samples (the replica, or the last stage): too many alternatives,
    a bias id outside the vocabulary or too many bias entries are INVALID_ARGUMENT before any
    compute, and a good request still gets its alternatives."""
    url, kind = mesh
    key = module_launcher.cluster_key
    view = httpx.get(f"{url}/api/cluster", timeout=10).json()
    placement = next(p for p in view["placements"] if p["kind"] == kind)
    sampler = placement["stages"][-1]
    address = next(n["address"] for n in view["nodes"] if n["id"] == sampler["node"])
    bias = pb.LogitBias
    bad = [({"top_logprobs": 21}, {}), ({}, {"logit_bias": [bias(token_id=10**6, bias=1.0)]}),
           ({}, {"logit_bias": [bias(token_id=i, bias=1.0) for i in range(1025)]})]

    async def calls() -> None:
        async with node_channel(address, key) as channel:
            stub = edgemesh_pb2_grpc.NodeStub(channel)
            if kind == "replica":
                def generate(request_fields: dict[str, Any], sampling_fields: dict[str, Any]) -> Any:
                    request = pb.GenerateRequest(request_id="r", prompt_tokens=[1, 2, 3], max_tokens=2,
                                                 sampling=pb.SamplingParams(temperature=0, **sampling_fields),
                                                 **request_fields)
                    return stub.Generate(request, timeout=30, metadata=sign(key, "/edgemesh.v1.Node/Generate",
                                                                             request))
                for request_fields, sampling_fields in bad:
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        async for _ in generate(request_fields, sampling_fields):
                            pass
                    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
                events = [e async for e in generate({"top_logprobs": 4}, {})]
                assert events and all(len(e.top_logprobs) == 4 for e in events)
                return
            layers = pb.LayerRange(first=sampler["layers"][0], last_exclusive=sampler["layers"][1])
            hidden = pb.Tensor(shape=[1, 576], dtype=pb.DTYPE_F32, data=np.zeros((1, 576), np.float32).tobytes())

            def step(request_fields: dict[str, Any], sampling_fields: dict[str, Any]) -> Any:
                return pb.ForwardRequest(session_id="lp", start_position=0, model_sha256=view["model"]["sha256"],
                                         step=1, layers=layers, hidden=hidden, reply_dtype=pb.DTYPE_F32,
                                         sampling=pb.SamplingParams(temperature=0, **sampling_fields),
                                         **request_fields)
            for request_fields, sampling_fields in [*bad, ({"top_logprobs": 4}, {})]:
                call = stub.Forward(timeout=30, metadata=sign(key, "/edgemesh.v1.Node/Forward"))
                await call.write(step(request_fields, sampling_fields))
                if request_fields.get("top_logprobs") == 4:
                    reply = await call.read()
                    assert len(reply.token.top_logprobs) == 4
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        await call.read()
                    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
                call.cancel()

    asyncio.run(calls())
    assert reference_llm.n_vocab() < 10**6


# On the pipeline only: its spare node takes the killed stage's layers.
@pytest.mark.parametrize("mesh", ["pipeline"], indirect=True)
def test_a_penalised_seeded_stream_survives_a_killed_stage(mesh: tuple[str, str]) -> None:
    url, _ = mesh
    client = client_of(url)
    body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0.8, "seed": 11,
            "frequency_penalty": 1.0, "presence_penalty": 0.5, "logit_bias": {"13": -5}, "logprobs": 2}

    def stream(kill_at: int | None = None, pid: int = 0) -> tuple[str, list[float]]:
        text, logprobs = "", []
        for index, chunk in enumerate(client.completions.create(**body, stream=True)):
            if index == kill_at:
                os.kill(pid, signal.SIGKILL)
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs is not None:
                logprobs += chunk.choices[0].logprobs.token_logprobs
        return text, logprobs

    clean_text, clean_logprobs = stream()
    view = httpx.get(f"{url}/api/cluster", timeout=10).json()
    stages = next(p for p in view["placements"] if p["kind"] == "pipeline")["stages"]
    victim = next(n["pid"] for n in view["nodes"] if n["id"] == stages[1]["node"])
    text, logprobs = stream(kill_at=10, pid=victim)
    assert text == clean_text and len(clean_text) > 20
    assert np.allclose(logprobs, clean_logprobs, atol=TOLERANCE, rtol=0)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'edgemesh_failovers_total{from="pipeline",reason="node_error",to="pipeline"} 1.0' in metrics
