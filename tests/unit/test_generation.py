"""The one generation loop (mesh.generation) on the replica engine, against llama.cpp itself on
a tiny model: greedy output is llama.cpp's, a replay continues exactly where the first run
was, stop and length end a stream, cancellation stops it and frees the slot, and log-
probabilities come through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mesh.types import GenerationRequest, RequestId, SamplingParams, TokenEvent
from node.engines.llamacpp import LlamaCppEngine
from tests.fixtures.tiny_gguf import SPECS, write_tiny_gguf

N_CTX = 256
STEPS = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = next(s for s in SPECS if s.name == "llama-f16")
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "llama-f16.gguf", spec)


@pytest.fixture(scope="module")
def reference(model: Path) -> tuple[list[int], list[int]]:
    """A prompt and llama.cpp's own greedy continuation of it."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), logits_all=True, n_ctx=N_CTX, n_threads=1, n_threads_batch=1,
                          verbose=False)
    prompt = llm.tokenize(b"the cat in the hat sat", add_bos=True, special=True)
    llm.eval(prompt)
    continuation: list[int] = []
    for _ in range(STEPS):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        continuation.append(token)
        llm.eval([token])
    llm.close()
    return prompt, continuation


@pytest.fixture(scope="module")
def engine(model: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(model, n_ctx=N_CTX, threads=1, slots=1)
    yield engine
    engine.close()


def request(prompt: list[int], **fields: object) -> GenerationRequest:
    base: dict[str, object] = {"request_id": RequestId("r"), "prompt_tokens": tuple(prompt),
                               "sampling": SamplingParams(temperature=0.0), "max_tokens": STEPS,
                               "stop_token_ids": frozenset()}
    return GenerationRequest(**{**base, **fields})  # type: ignore[arg-type]


def run(engine: LlamaCppEngine, req: GenerationRequest, cancel_after: int = 0) -> list[TokenEvent]:
    events: list[TokenEvent] = []
    for event in engine.generate(req, lambda: 0 < cancel_after <= len(events)):
        events.append(event)
    return events


def test_greedy_output_is_llama_cpp_and_ends_at_max_tokens(engine: LlamaCppEngine,
                                                           reference: tuple[list[int], list[int]]) -> None:
    prompt, continuation = reference
    events = run(engine, request(prompt))
    assert [e.token_id for e in events] == continuation
    assert [e.position for e in events] == list(range(len(prompt), len(prompt) + STEPS))
    assert [e.finish_reason for e in events] == [None] * (STEPS - 1) + ["length"]


def test_a_replay_continues_where_the_first_run_was(engine: LlamaCppEngine,
                                                    reference: tuple[list[int], list[int]]) -> None:
    prompt, continuation = reference
    events = run(engine, request(prompt, replay_tokens=tuple(continuation[:3])))
    assert [e.token_id for e in events] == continuation[3:]  # the replayed ones are not sent again
    assert events[0].position == len(prompt) + 3 and events[-1].finish_reason == "length"


def test_stop_token_context_end_and_cancellation(engine: LlamaCppEngine,
                                                 reference: tuple[list[int], list[int]]) -> None:
    prompt, continuation = reference
    stop = continuation[2]
    events = run(engine, request(prompt, stop_token_ids=frozenset({stop})))
    first = continuation.index(stop)
    assert [e.token_id for e in events] == continuation[:first + 1] and events[-1].finish_reason == "stop"

    short = LlamaCppEngine(engine.model_path, n_ctx=len(prompt) + 3, threads=1, slots=1)
    try:
        events = run(short, request(prompt, max_tokens=50))
    finally:
        short.close()
    assert len(events) == 3 and events[-1].finish_reason == "length"  # the context is full

    events = run(engine, request(prompt), cancel_after=2)
    assert len(events) == 2 and all(e.finish_reason is None for e in events)
    # the one slot was given back: the next request gets it
    assert [e.token_id for e in run(engine, request(prompt))] == continuation


def test_logprobs_and_top_logprobs_come_through(engine: LlamaCppEngine,
                                                reference: tuple[list[int], list[int]]) -> None:
    prompt, _ = reference
    events = run(engine, request(prompt, logprobs=True, top_logprobs=3, max_tokens=3))
    for event in events:
        assert event.logprob < 0.0 and len(event.top_logprobs) == 3
        assert event.top_logprobs[0].token_id == event.token_id  # greedy: the likeliest
        assert event.top_logprobs[0].logprob == pytest.approx(event.logprob)


def test_a_pipeline_draws_the_same_tokens_through_the_same_loop(model: Path,
                                                                reference: tuple[list[int], list[int]]) -> None:
    """Two stages of the tiny model on a real StageHost, driven by PipelineRun in process: greedy
    output is llama.cpp's, a replay continues it, and every session is freed at the end."""
    from prometheus_client import CollectorRegistry

    from mesh.metrics import NodeMetrics
    from mesh.pipeline import HubStages, PipelineRun
    from mesh.types import LayerRange, NodeId, PipelineHop, PipelineJob
    from node.compute import ComputeThread
    from node.daemon import describe_file
    from node.pipeline_head import LocalStageLink
    from node.stage_host import LocalFile, StageHost

    prompt, continuation = reference
    held = describe_file(model, N_CTX)
    stages = StageHost([LocalFile(model, held)], 1, NodeMetrics(CollectorRegistry()))
    compute = ComputeThread()
    split = held.n_layers // 2
    ranges = (LayerRange(0, split), LayerRange(split, held.n_layers))
    try:
        for layers in ranges:
            stages.load(held.sha256, layers, N_CTX, 2)

        def tokens(req: GenerationRequest) -> list[TokenEvent]:
            job = PipelineJob(request=req, n_ctx=N_CTX,
                              stages=tuple(PipelineHop(NodeId("n"), "local", r) for r in ranges))
            run = PipelineRun(job, LocalStageLink(stages, compute),
                              HubStages([LocalStageLink(stages, compute)], ["n"], lambda *_sent: None))

            async def collect() -> list[TokenEvent]:
                return [event async for event in run.generate()]

            events = asyncio.run(collect())
            compute.call(lambda: None).result()  # the links' releases are queued ahead of this
            return events

        first = tokens(request(prompt, model_sha256=held.sha256))
        assert [e.token_id for e in first] == continuation and first[-1].finish_reason == "length"
        replayed = tokens(request(prompt, model_sha256=held.sha256, replay_tokens=tuple(continuation[:3])))
        assert [e.token_id for e in replayed] == continuation[3:]
        deadline = time.monotonic() + 5
        while stages.sessions() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stages.sessions() == 0
    finally:
        compute.close()
        stages.close()


def test_a_step_after_the_compute_thread_stopped_fails_at_once_instead_of_hanging(model: Path) -> None:
    from mesh.errors import Unavailable
    from node.compute import ComputeThread
    from node.engines.decode_batch import DecodeBatch

    compute = ComputeThread()
    batch = DecodeBatch(model, n_ctx=N_CTX, threads=1, n_seqs=1, compute=compute)
    try:
        assert batch.step(0, [1, 2, 3], 0, fresh=True).shape == (batch.n_vocab,)
        compute.close()  # the node is stopping
        started = time.monotonic()
        with pytest.raises(Unavailable, match="compute thread has stopped"):
            batch.step(0, [4], 3)
        assert time.monotonic() - started < 1.0
    finally:
        batch.close()
