"""A short seeded sample of benchmarks/activation_dtype.py: three stage engines with the hidden
states going through the real wire codec between them. In f32 the tokens are llama.cpp's own;
f16 and q8_0 generate as many tokens (how many agree with f32 is the benchmark's to report)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from benchmarks import activation_dtype as bench
from tests.conftest import TEST_THREADS

PROMPTS = bench.PROMPTS[:2]
TOKENS = 24


def test_f32_over_the_wire_is_llama_cpp_and_the_report_counts_drift(default_model: Path, reference_llm: Any) -> None:
    encoded = bench.tokenize(default_model, PROMPTS)
    runs = bench.greedy_runs(default_model, encoded, TOKENS, n_stages=3, threads=TEST_THREADS)
    for prompt, tokens, got in zip(PROMPTS, encoded, runs["f32"], strict=True):
        reference_llm.reset()  # llama.cpp's greedy tokens, past an end-of-text token as the benchmark goes
        want = list(itertools.islice(reference_llm.generate(tokens, temp=0.0, reset=True), TOKENS))
        assert got == want, prompt
    results = {r.dtype: r for r in bench.agreement(runs, TOKENS)}
    assert results["f32"].identical == len(PROMPTS) and results["f32"].share == 1.0
    for dtype in ("f16", "q8_0"):
        assert all(len(tokens) == TOKENS for tokens in runs[dtype])
        assert results[dtype].total_tokens == TOKENS * len(PROMPTS)
