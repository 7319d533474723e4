"""mesh.sampling is a pure function of (logits, params, history, position)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import InvalidInput
from mesh.sampling import apply_penalties, apply_repeat_penalty, check_request, sample, token_logprob, top_logprobs
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


def test_frequency_and_presence_penalties_count_the_window_as_llama_cpp_does() -> None:
    logits = logits_of([3.0, 2.5, 1.0, -1.0])
    history = [0, 0, 0, 3, 1]  # token 0 three times, 1 and 3 once each
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25, repeat_last_n=64)
    out = apply_penalties(logits, history, params)
    # logit -= count * frequency + (count > 0) * presence
    assert out.tolist() == pytest.approx([3.0 - 1.5 - 0.25, 2.5 - 0.5 - 0.25, 1.0, -1.0 - 0.5 - 0.25])
    assert logits.tolist() == [3.0, 2.5, 1.0, -1.0]  # input untouched
    # the window is the last repeat_last_n tokens only: here just [3, 1]
    windowed = apply_penalties(logits, history, SamplingParams(frequency_penalty=0.5, repeat_last_n=2))
    assert windowed.tolist() == pytest.approx([3.0, 2.0, 1.0, -1.5])
    # repeat penalty first, then frequency/presence on the same token (llama.cpp's order)
    both = apply_penalties(logits, [0], SamplingParams(repeat_penalty=2.0, frequency_penalty=1.0, repeat_last_n=8))
    assert both[0] == pytest.approx(3.0 / 2.0 - 1.0)


def test_penalties_change_the_greedy_choice() -> None:
    logits = logits_of([2.0, 1.8, 0.0])
    assert sample(logits, GREEDY, [0, 0], 3).token_id == 0
    frequency = SamplingParams(temperature=0.0, frequency_penalty=0.15, repeat_last_n=64)
    assert sample(logits, frequency, [0], 3).token_id == 0  # one occurrence: 1.85 > 1.8
    assert sample(logits, frequency, [0, 0], 3).token_id == 1  # two: 1.7 < 1.8 (count-based)
    presence = SamplingParams(temperature=0.0, presence_penalty=0.3, repeat_last_n=64)
    assert sample(logits, presence, [0], 3).token_id == 1
    assert sample(logits, presence, [2], 3).token_id == 0  # only tokens in the window are penalised


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = logits_of([5.0, 1.0, 0.5, -3.0])
    banned = SamplingParams(temperature=0.0, logit_bias=((0, -100.0),))
    assert sample(logits, banned, [], 0).token_id == 1
    forced = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, logit_bias=((3, 100.0),))
    assert {sample(logits, forced, [], p).token_id for p in range(50)} == {3}
    # bias comes before the penalties: a biased token is still penalised for repeating
    both = SamplingParams(temperature=0.0, logit_bias=((3, 8.5),), presence_penalty=2.0, repeat_last_n=8)
    assert sample(logits, both, [], 0).token_id == 3
    assert sample(logits, both, [3], 1).token_id == 0
    # log-probabilities describe the model's own logits, not the biased ones
    chosen = sample(logits, forced, [], 0, want_logprob=True)
    assert chosen.logprob == pytest.approx(token_logprob(logits, 3))


def test_penalised_seeded_sampling_is_a_pure_function_of_seed_and_position() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=300).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=9, frequency_penalty=0.7,
                            presence_penalty=0.4, logit_bias=((5, 3.0), (7, -100.0)))
    history = [int(t) for t in rng.integers(0, 300, size=80)]
    draws = [sample(logits, params, history, p).token_id for p in range(60)]
    assert draws == [sample(logits.copy(), params, list(history), p).token_id for p in range(60)]
    assert 7 not in draws and len(set(draws)) > 5
    plain = SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=9)
    assert draws != [sample(logits, plain, history, p).token_id for p in range(60)]


def test_top_logprobs_are_the_raw_log_softmax_most_likely_first_ties_by_id() -> None:
    logits = logits_of([1.0, 3.0, 2.0, 3.0, -1.0])
    top = top_logprobs(logits, 3)
    assert [t.token_id for t in top] == [1, 3, 2]
    x = logits.astype(np.float64)
    reference = x - np.log(np.exp(x).sum())
    assert [t.logprob for t in top] == pytest.approx([reference[1], reference[3], reference[2]], abs=1e-12)
    assert [t.token_id for t in top_logprobs(logits, 1)] == [1]  # a tie at the cut keeps the smaller id
    assert len(top_logprobs(logits, 20)) == 5 and top_logprobs(logits, 0) == ()
    # computed before bias and penalties: a banned token still shows its model probability
    banned = SamplingParams(temperature=0.0, logit_bias=((1, -100.0),), frequency_penalty=2.0)
    chosen = sample(logits, banned, [3], 0, want_logprob=True, n_top_logprobs=2)
    assert chosen.token_id == 2 and [t.token_id for t in chosen.top] == [1, 3]


def test_node_side_limits() -> None:
    check_request(SamplingParams(logit_bias=((9, 100.0),)), 20, n_vocab=10)
    with pytest.raises(InvalidInput, match="outside the vocabulary of 10"):
        check_request(SamplingParams(logit_bias=((10, 1.0),)), 0, n_vocab=10)
    with pytest.raises(InvalidInput, match="top_logprobs"):
        check_request(SamplingParams(), 21, n_vocab=10)
    with pytest.raises(InvalidInput, match=r"outside -100\.\.100"):
        check_request(SamplingParams(logit_bias=((1, float("nan")),)), 0, n_vocab=10)
    with pytest.raises(InvalidInput, match="more than 1024"):
        check_request(SamplingParams(logit_bias=tuple((i, 1.0) for i in range(1025))), 0, n_vocab=2000)
