"""gemma-3 in a replica batch: eight greedy sessions at once, each the answer it gets alone.

Unlike the default model's, gemma-3's (Q4_K) numbers change when eight rows decode in one
step: two of these eight answers turned away from their solo runs. The batch measures at load
how many rows agree bit for bit with a row alone and cuts its steps to that
(node.engines.decode_batch): this test holds it to the promise on a model where it matters."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.types import GenerationRequest, RequestId, SamplingParams, TokenEvent
from node.engines.llamacpp import LlamaCppEngine
from tests.conftest import TEST_THREADS

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about the sea:", "1, 2, 3, 4,", "def fibonacci(n):",
           "Once upon a time", "Q: What is the boiling point of water? A:", "Translate to French: good morning",
           "The three primary colours are"]


@pytest.fixture(scope="module")
def engine(gemma3_model: Path) -> Iterator[LlamaCppEngine]:
    engine = LlamaCppEngine(gemma3_model, n_ctx=256, threads=TEST_THREADS, slots=len(PROMPTS))
    yield engine
    engine.close()


def test_eight_gemma3_sessions_at_once_are_each_their_solo_answer(engine: LlamaCppEngine, gemma3_model: Path) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(gemma3_model), vocab_only=True, verbose=False)
    requests = [GenerationRequest(RequestId(f"g{i}"), tuple(vocab.tokenize(p.encode(), add_bos=True)),
                                  SamplingParams(temperature=0.0), 32, frozenset()) for i, p in enumerate(PROMPTS)]
    solo = [[e.token_id for e in engine.generate(r, lambda: False)] for r in requests]
    got: list[list[int]] = [[] for _ in requests]
    futures = [engine.stream(r, lambda: False, functools.partial(_append, got[i])) for i, r in enumerate(requests)]
    for future in futures:
        future.result(timeout=300)
    assert got == solo  # with steps of all eight rows, two of them differed (2026-12-04)
    assert engine._batch.max_rows > 1  # still batched


def _append(into: list[int], event: TokenEvent) -> None:
    into.append(event.token_id)
