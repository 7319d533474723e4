"""How much f16 and q8_0 hidden states change a pipeline's greedy output (--activation-dtype).

Three stage engines hold the model's layers in-process; between stages the hidden states go
through the real wire codec (mesh.transport.convert: encoded, serialized, parsed, decoded), in
f32, f16 or q8_0. For each prompt, every dtype's greedy tokens are compared with f32's (which
is llama.cpp's output: see tests/integration/test_stage_parity.py and the ring tests):

  identical   prompts whose tokens all equal f32's
  agreement   tokens before the first difference, over all tokens generated
  first diff  the median position of the first difference among the prompts that differ

    .venv/bin/python -m benchmarks.activation_dtype [--model default|gemma3-270m|PATH] [--prompts 20]
        [--tokens 1000] [--stages 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.transport import convert
from mesh.transport.generated import edgemesh_pb2 as pb
from mesh.types import HiddenDType
from node.engines.stage import StageEngine
from node.engines.stage.weights import read_header

log = logging.getLogger("activation_dtype")

# Twenty prompts of different kinds: prose, code, lists, dialogue, facts, other languages.
PROMPTS = (
    "The history of the printing press",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "def fibonacci(n):",
    "The three primary colours are",
    "Q: What is the capital of France?\nA:",
    "Once upon a time, in a small village at the edge of a forest,",
    "Here is a list of ten fruits:\n1.",
    "The theory of general relativity explains",
    "import numpy as np\n\n# compute the mean of each row\n",
    "Dear hiring manager, I am writing to apply for",
    "The recipe for a simple tomato soup:",
    "In 1969, the first humans landed on",
    "La ville de Paris est connue pour",
    "SELECT name, email FROM users WHERE",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
    "User: Can you help me plan a trip to Japan?\nAssistant:",
    "The rules of chess are simple:",
    "A haiku about the sea:\n",
    "<html>\n<head>\n<title>",
)
DTYPES: tuple[HiddenDType, ...] = ("f32", "f16", "q8_0")


def bounds_of(n_layer: int, n_stages: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n_layer, n_stages + 1).round().astype(int).tolist()
    return list(itertools.pairwise(edges))


def over_the_wire(hidden: npt.NDArray[np.float32], dtype: HiddenDType) -> npt.NDArray[np.float32]:
    """What the next stage receives: encoded, serialized, parsed and decoded as a step carries it."""
    wire = convert.tensor_to_pb(hidden, dtype).SerializeToString()
    return convert.tensor_from_pb(pb.Tensor.FromString(wire))


class WirePipeline:
    def __init__(self, path: Path, n_stages: int, n_ctx: int, threads: int) -> None:
        args, _ = read_header(path)
        self.stages = [StageEngine.load(path, a, b, n_ctx=n_ctx, slots=1, threads=threads)
                       for a, b in bounds_of(args.n_layer, n_stages)]

    def greedy(self, prompt: Sequence[int], n_tokens: int, dtype: HiddenDType, session: str) -> list[int]:
        out: list[int] = []
        tokens, start = list(prompt), 0
        for _ in range(n_tokens):
            x = self.stages[0].forward(session, start, tokens=tokens)
            for stage in self.stages[1:]:
                x = stage.forward(session, start, hidden=over_the_wire(x, dtype))
            start += len(tokens)
            tokens = [int(np.argmax(x[-1] if x.ndim == 2 else x))]
            out.append(tokens[0])
        for stage in self.stages:
            stage.release(session)
        return out

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


@dataclass(frozen=True)
class Agreement:
    dtype: HiddenDType
    prompts: int
    identical: int
    agreed_tokens: int
    total_tokens: int
    first_differences: tuple[int, ...]

    @property
    def share(self) -> float:
        return self.agreed_tokens / self.total_tokens if self.total_tokens else 1.0


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


Runs = dict[HiddenDType, list[list[int]]]  # each dtype's greedy tokens, prompt by prompt


def greedy_runs(path: Path, encoded: Sequence[Sequence[int]], n_tokens: int, n_stages: int, threads: int) -> Runs:
    n_ctx = max(len(e) for e in encoded) + n_tokens + 8
    pipe = WirePipeline(path, n_stages, n_ctx, threads)
    runs: dict[HiddenDType, list[list[int]]] = {d: [] for d in DTYPES}
    try:
        for index, prompt in enumerate(encoded):
            for dtype in DTYPES:
                started = time.perf_counter()
                runs[dtype].append(pipe.greedy(prompt, n_tokens, dtype, f"p{index}-{dtype}"))
                log.info("prompt %d/%d, %s: %d tokens in %.1fs", index + 1, len(encoded), dtype, n_tokens,
                         time.perf_counter() - started)
    finally:
        pipe.close()
    return runs


def agreement(runs: Runs, n_tokens: int) -> list[Agreement]:
    results = []
    for dtype in DTYPES:
        diffs = [first_difference(ref, got) for ref, got in zip(runs["f32"], runs[dtype], strict=True)]
        agreed = sum(n_tokens if d is None else d for d in diffs)
        results.append(Agreement(dtype, len(diffs), sum(d is None for d in diffs), agreed, n_tokens * len(diffs),
                                 tuple(d for d in diffs if d is not None)))
    return results


def tokenize(path: Path, prompts: Sequence[str]) -> list[list[int]]:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [vocab.tokenize(p.encode()) for p in prompts]


def report(results: Sequence[Agreement], n_tokens: int) -> str:
    lines = [f"greedy agreement with f32 hidden states, {n_tokens} tokens per prompt",
             f"{'dtype':6} {'identical':>11} {'agreement':>10} {'first diff (median)':>20}"]
    for r in results:
        first = f"{statistics.median(r.first_differences):.0f}" if r.first_differences else "-"
        lines.append(f"{r.dtype:6} {r.identical:>5}/{r.prompts:<5} {r.share:>10.1%} {first:>20}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from mesh.model_store import resolve

    path = resolve(args.model)  # a catalogue name comes from its PyPI wheels (pip), never a hub
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    runs = greedy_runs(path, tokenize(path, prompts), args.tokens, args.stages, args.threads)
    sys.stdout.write(report(agreement(runs, args.tokens), args.tokens) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
