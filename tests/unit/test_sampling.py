"""mesh.sampling is a pure function of (logits, params, history, position)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.sampling import apply_repeat_penalty, sample, token_logprob
from mesh.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=0)


def logits_of(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def test_greedy_is_argmax_and_ignores_the_seed() -> None:
    logits = logits_of([0.1, 3.0, -2.0, 2.9])
    assert sample(logits, GREEDY, [], 5).token_id == 1
    assert sample(logits, SamplingParams(temperature=0.0, seed=77), [], 9).token_id == 1


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = logits_of([2.0, -1.0, 0.5])
    out = apply_repeat_penalty(logits, [0, 1], penalty=2.0, last_n=64)
    assert out.tolist() == [1.0, -2.0, 0.5]
    assert logits.tolist() == [2.0, -1.0, 0.5]  # input untouched
    # the penalty can flip a greedy choice
    params = SamplingParams(temperature=0.0, repeat_penalty=4.0, repeat_last_n=8)
    assert sample(logits_of([2.0, 1.0]), params, [0], 3).token_id == 1


def test_same_seed_and_position_draw_the_same_token() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=42)
    draws = [sample(logits, params, [], pos).token_id for pos in range(40)]
    again = [sample(logits, params, [], pos).token_id for pos in range(40)]
    other = [sample(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=43), [], pos).token_id
             for pos in range(40)]
    assert draws == again
    assert draws != other
    assert len(set(draws)) > 5  # it does sample


def test_top_k_one_is_greedy() -> None:
    logits = logits_of([0.0, 5.0, 4.9, 1.0])
    for seed in range(20):
        assert sample(logits, SamplingParams(temperature=1.5, top_k=1, seed=seed), [], 0).token_id == 1


def test_logprob_is_log_softmax() -> None:
    logits = logits_of([1.0, 2.0, 3.0])
    expected = 3.0 - np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))
    assert token_logprob(logits, 2) == pytest.approx(expected, rel=1e-6)
    assert sample(logits, GREEDY, [], 0, want_logprob=True).logprob == pytest.approx(expected, rel=1e-6)


def test_rejects_bad_logits() -> None:
    with pytest.raises(ValueError):
        sample(np.zeros((2, 2), dtype=np.float32), GREEDY, [], 0)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=60),
       top_k=st.integers(0, 10), top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.9),
       temperature=st.floats(0.05, 2.0), seed=st.integers(0, 2**63 - 1), position=st.integers(0, 4096))
def test_sampled_token_respects_top_k_top_p_and_min_p(values: list[float], top_k: int, top_p: float,
                                                      min_p: float, temperature: float, seed: int,
                                                      position: int) -> None:
    logits = logits_of(values)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    token = sample(logits, params, [], position).token_id
    assert 0 <= token < len(values)
    if top_k:
        # never outside the k best (ties may admit equal logits)
        kth = np.sort(logits)[::-1][min(top_k, len(values)) - 1]
        assert logits[token] >= kth
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert probs[token] >= min_p * probs.max() - 1e-9
