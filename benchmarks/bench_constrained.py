"""Cost of grammar-constrained decoding (mesh.constraints) on the replica engine.

Decode tokens/s (from the first token to the last, so prefill is excluded) of a json_schema
request against the same request unconstrained, on one LlamaCppEngine slot with the same
prompt, seed and threads; --repeats interleaved pairs (alternating which runs first). Prints each pair's ratio
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

import numpy as np

from mesh.constraints import VOCABULARIES, Matcher, json_constraint
from mesh.tokenizer import Tokenizer
from mesh.types import Constraint, GenerationRequest, RequestId, SamplingParams
from node.engines.llamacpp import LlamaCppEngine

log = logging.getLogger("bench_constrained")
SCHEMA = {"type": "object", "required": ["title", "story"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string"}}}
ASK = [{"role": "user", "content": "Write a short story about a lighthouse keeper, as JSON with a title and a story."}]


def decode_rate(engine: LlamaCppEngine, prompt: list[int], tokens: int, constraint: Constraint | None) -> tuple[
        float, list[int]]:
    request = GenerationRequest(request_id=RequestId("bench"), prompt_tokens=tuple(prompt),
                                sampling=SamplingParams(temperature=0.8, seed=7), max_tokens=tokens,
                                stop_token_ids=frozenset(), constraint=constraint)
    stamps, ids = [], []
    for event in engine.generate(request, lambda: False):
        stamps.append(time.perf_counter())
        ids.append(event.token_id)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), ids


def mask_seconds(path: Path, constraint: Constraint, tokens: list[int], n_vocab: int) -> float:
    """Median time of one step's grammar work (mask the logits, consume the token), alone."""
    matcher = Matcher.for_model(path, constraint)
    logits = np.zeros(n_vocab, dtype=np.float32)
    times = []
    for token in tokens:
        started = time.perf_counter()
        matcher.mask(logits)
        matcher.consume([token])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from mesh.model_store import resolve

    path = resolve(args.model)
    prompt = Tokenizer.load(path).encode_chat(ASK)
    engine = LlamaCppEngine(path, n_ctx=1024, threads=args.threads, slots=1)
    VOCABULARIES.get(path)  # built once per process (about a second): not part of a request's cost
    constraint = json_constraint(SCHEMA, "response_format")
    decode_rate(engine, prompt, 8, None)  # warm-up: pages of the mapped file, the compute buffers
    ratios, free_rates = [], []
    ids: list[int] = []
    for run in range(args.repeats):
        # Alternate which goes first, so a drift in the machine's load favours neither.
        if run % 2:
            constrained, ids = decode_rate(engine, prompt, args.tokens, constraint)
            free, free_ids = decode_rate(engine, prompt, args.tokens, None)
        else:
            free, free_ids = decode_rate(engine, prompt, args.tokens, None)
            constrained, ids = decode_rate(engine, prompt, args.tokens, constraint)
        ratios.append(constrained / free)
        free_rates.append(free)
        print(f"run {run + 1}: free {free:6.1f} tok/s ({len(free_ids)} tokens), json_schema {constrained:6.1f} "
              f"tok/s ({len(ids)} tokens), ratio {ratios[-1]:.3f}")
    step = mask_seconds(path, constraint, ids, engine.n_vocab)
    print(json.dumps({"model": path.name, "threads": args.threads, "median_ratio": round(statistics.median(ratios), 3),
                      "lowest": round(min(ratios), 3), "highest": round(max(ratios), 3),
                      "mask_ms_per_token": round(step * 1000, 3),
                      "mask_share_of_a_free_step": round(step * statistics.median(free_rates), 3)}))


if __name__ == "__main__":
    main()
