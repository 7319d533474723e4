"""Cost of grammar-constrained decoding (mesh.constraints) on the replica engine.

Decode tokens/s (from the first token to the last, so prefill is excluded) of a json_schema
request against the same request unconstrained, on one LlamaCppEngine slot with the same
prompt, seed and threads; --repeats interleaved pairs. Prints each pair's ratio
(constrained / free) and the median with the lowest and highest beside it. The schema has a
long free string, so the constrained answer runs as long as the free one.

    .venv/bin/python benchmarks/bench_constrained.py [--model default|PATH] [--threads 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.constraints import VOCABULARIES, json_constraint
from mesh.tokenizer import Tokenizer
from mesh.types import Constraint, GenerationRequest, RequestId, SamplingParams
from node.engines.llamacpp import LlamaCppEngine

log = logging.getLogger("bench_constrained")
SCHEMA = {"type": "object", "required": ["title", "story"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string"}}}
ASK = [{"role": "user", "content": "Write a short story about a lighthouse keeper, as JSON with a title and a story."}]


def decode_rate(engine: LlamaCppEngine, prompt: list[int], tokens: int, constraint: Constraint | None) -> tuple[
        float, int]:
    request = GenerationRequest(request_id=RequestId("bench"), prompt_tokens=tuple(prompt),
                                sampling=SamplingParams(temperature=0.8, seed=7), max_tokens=tokens,
                                stop_token_ids=frozenset(), constraint=constraint)
    stamps = [time.perf_counter() for _event in engine.generate(request, lambda: False)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from mesh.model_store import resolve

    path = resolve(args.model)
    prompt = Tokenizer.load(path).encode_chat(ASK)
    engine = LlamaCppEngine(path, n_ctx=1024, threads=args.threads, slots=1)
    VOCABULARIES.get(path)  # built once per process (about a second): not part of a request's cost
    constraint = json_constraint(SCHEMA, "response_format")
    decode_rate(engine, prompt, 8, None)  # warm-up: pages of the mapped file, the compute buffers
    ratios = []
    for run in range(args.repeats):
        free, n_free = decode_rate(engine, prompt, args.tokens, None)
        constrained, n_constrained = decode_rate(engine, prompt, args.tokens, constraint)
        ratios.append(constrained / free)
        print(f"run {run + 1}: free {free:6.1f} tok/s ({n_free} tokens), json_schema {constrained:6.1f} tok/s "
              f"({n_constrained} tokens), ratio {ratios[-1]:.3f}")
    print(json.dumps({"model": path.name, "threads": args.threads, "median_ratio": round(statistics.median(ratios), 3),
                      "lowest": round(min(ratios), 3), "highest": round(max(ratios), 3)}))


if __name__ == "__main__":
    main()
