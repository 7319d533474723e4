"""The replica engine decodes its sessions together, and each answer is still the one it gets
alone: greedy output is llama.cpp's, seeded sampling is the solo seeded run, and a session
cancelled mid-batch frees its slot while the others go on unchanged. The default model, since
parity is the point."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mesh.types import GenerationRequest, RequestId, SamplingParams, TokenEvent
from node.engines.llamacpp import LlamaCppEngine
from tests.conftest import TEST_THREADS, Launcher, gateway_url, wait_for_nodes

N_CTX = 512
SLOTS = 8
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the mountains, there lived",
    "Q: What is the boiling point of water? A:",
    "Translate to French: good morning",
    "The three primary colours are",
]
LENGTHS = [24, 9, 31, 16, 40, 12, 20, 28]  # different lengths: sessions leave the batch at different steps


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(default_model, n_ctx=N_CTX, threads=TEST_THREADS, slots=SLOTS, on_step=ROWS.append)
    yield engine
    engine.close()


ROWS: list[int] = []  # rows of every batched step, as the engine reports them


def request(i: int, tokens: list[int], sampling: SamplingParams) -> GenerationRequest:
    return GenerationRequest(RequestId(f"b{i}"), tuple(tokens), sampling, LENGTHS[i], frozenset())


def together(engine: LlamaCppEngine, requests: list[GenerationRequest],
             cancel: dict[int, int] | None = None) -> list[list[TokenEvent]]:
    """All requests at once through the engine's streams; cancel[i] = n stops request i after n tokens."""
    got: list[list[TokenEvent]] = [[] for _ in requests]
    cancel = cancel or {}
    futures = []
    for i, req in enumerate(requests):
        stop = threading.Event()

        def emit(event: TokenEvent, i: int = i, stop: threading.Event = stop) -> None:
            got[i].append(event)
            if i in cancel and len(got[i]) >= cancel[i]:
                stop.set()

        futures.append(engine.stream(req, stop.is_set, emit))
    for future in futures:
        future.result(timeout=300)
    return got


def alone(engine: LlamaCppEngine, req: GenerationRequest) -> list[int]:
    return [e.token_id for e in engine.generate(req, lambda: False)]


def test_eight_greedy_sessions_at_once_are_each_llama_cpps_own_answer(engine: LlamaCppEngine,
                                                                       reference_llm: Any) -> None:
    encoded = [reference_llm.tokenize(p.encode(), add_bos=True, special=True) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0)
    ROWS.clear()
    got = together(engine, [request(i, t, greedy) for i, t in enumerate(encoded)])
    assert max(ROWS) >= SLOTS // 2, ROWS  # they did decode together
    for i, tokens in enumerate(encoded):
        want = list(itertools.islice(reference_llm.generate(tokens, temp=0.0, reset=True), LENGTHS[i]))
        ids = [e.token_id for e in got[i]]
        # llama.cpp's generator goes on past an end-of-text token; the engine stops there
        assert ids == want[:len(ids)] and (len(ids) == LENGTHS[i] or got[i][-1].finish_reason == "stop"), PROMPTS[i]
        assert [e.position for e in got[i]] == list(range(len(tokens), len(tokens) + len(ids)))


def test_seeded_sampling_at_once_is_the_solo_seeded_run(engine: LlamaCppEngine, reference_llm: Any) -> None:
    encoded = [reference_llm.tokenize(p.encode(), add_bos=True, special=True) for p in PROMPTS]
    requests = [request(i, t, SamplingParams(temperature=0.8, seed=100 + i)) for i, t in enumerate(encoded)]
    solo = [alone(engine, r) for r in requests]
    got = together(engine, requests)
    assert [[e.token_id for e in g] for g in got] == solo


def test_a_session_cancelled_mid_batch_frees_its_slot_and_the_others_go_on_unchanged(
        engine: LlamaCppEngine, reference_llm: Any) -> None:
    encoded = [reference_llm.tokenize(p.encode(), add_bos=True, special=True) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0)
    requests = [request(i, t, greedy) for i, t in enumerate(encoded)]
    solo = [alone(engine, r) for r in requests]
    got = together(engine, requests, cancel={4: 5})
    assert [e.token_id for e in got[4]] == solo[4][:len(got[4])] and 5 <= len(got[4]) < len(solo[4])
    assert all(e.finish_reason is None for e in got[4])
    for i in (0, 1, 2, 3, 5, 6, 7):
        assert [e.token_id for e in got[i]] == solo[i]
    # every slot is free again: eight more at once are all taken
    again = together(engine, requests)
    assert [[e.token_id for e in g] for g in again] == solo


def test_a_long_prompt_beside_decoding_sessions_goes_in_between_their_steps_and_changes_no_answer(
        engine: LlamaCppEngine, reference_llm: Any) -> None:
    greedy = SamplingParams(temperature=0.0)
    running = [GenerationRequest(RequestId(f"run{i}"), tuple(reference_llm.tokenize(p.encode(), add_bos=True)),
                                 greedy, 80, frozenset()) for i, p in enumerate(PROMPTS[:4])]
    numbers = ", ".join(str(i) for i in range(1, 400)).encode()
    long_prompt = tuple(reference_llm.tokenize(numbers, add_bos=True)[:400])
    long = GenerationRequest(RequestId("long"), long_prompt, greedy, 8, frozenset())
    solo = [alone(engine, r) for r in [*running, long]]

    arrivals: list[list[float]] = [[] for _ in running]
    got: list[list[int]] = [[] for _ in running]

    def emit(i: int, event: TokenEvent) -> None:
        got[i].append(event.token_id)
        arrivals[i].append(time.monotonic())

    futures = [engine.stream(r, lambda: False, functools.partial(emit, i)) for i, r in enumerate(running)]
    deadline = time.monotonic() + 120
    while min(len(a) for a in arrivals) < 3:
        assert time.monotonic() < deadline, "the running sessions did not start"
        time.sleep(0.005)
    sent = time.monotonic()
    long_tokens = []
    for event in engine.generate(long, lambda: False):
        if not long_tokens:
            first = time.monotonic()
        long_tokens.append(event.token_id)
    for future in futures:
        future.result(timeout=300)
    assert [*got, long_tokens] == solo
    # Fed whole, the 400-token chunk would sit between two of their steps: one token each at
    # most while it is evaluated. Fed in pieces, the running sessions go on decoding.
    during = [len([t for t in a if sent < t < first]) for a in arrivals]
    assert min(during) >= 4, during


def test_a_replica_node_started_as_a_device_batches_concurrent_chats_through_the_gateway(
        launcher: Launcher, default_model: Path, reference_llm: Any) -> None:
    """The README's device commands, one by one (`edgemesh node --role replica --slots 4`, then
    `edgemesh gateway --peer`): four completions sent at once are decoded together on the node
    and each is llama.cpp's own greedy answer."""
    node = launcher.node("desk", default_model, "--role", "replica", "--slots", "4")
    url = gateway_url(launcher.gateway("gw", default_model, "--no-discovery", "--peer", f"127.0.0.1:{node.ready[1]}"))
    wait_for_nodes(url, 1)
    asks = PROMPTS[:4]
    wanted = []
    for prompt in asks:
        reference_llm.reset()
        wanted.append(reference_llm.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"])

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                "prompt": p, "max_tokens": 24, "temperature": 0}) for p in asks))

    answers = asyncio.run(together())
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert [r.json()["choices"][0]["text"] for r in answers] == wanted
    metrics = httpx.get(f"http://127.0.0.1:{node.ready[2]}/metrics", timeout=10).text
    rows = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("edgemesh_node_decode_batch_rows_")}
    steps, row_total = rows["edgemesh_node_decode_batch_rows_count"], rows["edgemesh_node_decode_batch_rows_sum"]
    assert row_total / steps > 1.5, rows  # the four decoded together, not one after another
