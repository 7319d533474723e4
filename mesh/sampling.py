"""Token sampling as a pure function of (logits, params, history, position).

The same function runs on a replica node and on the last stage of a pipeline, so a
session replayed onto another placement draws the same tokens: the random draw for
position p comes from a generator seeded with (seed, p), never from shared state.

The order of the filters follows llama.cpp's default chain: logit bias, the penalties
(repeat, frequency, presence: llama_sampler_init_penalties), top-k, top-p, min-p (on the
untempered distribution), then temperature and the draw.

Log-probabilities (the chosen token's and the top alternatives) are the log-softmax of the
model's raw logits, before bias, penalties and temperature: what llama.cpp's own logits give,
so they describe the model, not the sampler settings of one request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mesh.errors import InvalidInput
from mesh.types import SamplingParams, TopLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's maximum for top_logprobs
MAX_LOGIT_BIAS = 1024  # entries of logit_bias a node accepts
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, +100 all but forces it


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float  # log-probability under the model's own (untempered) distribution
    top: tuple[TopLogprob, ...] = ()  # the most likely tokens under the same distribution


def check_request(params: SamplingParams, top_logprobs: int, n_vocab: int) -> None:
    """What a node refuses before any compute (InvalidInput): the sampler indexes the logits
    with these ids, so an id outside the vocabulary must never reach it."""
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidInput(f"top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs}")
    if len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidInput(f"logit_bias has {len(params.logit_bias)} entries, more than {MAX_LOGIT_BIAS}")
    for token, bias in params.logit_bias:
        if not 0 <= token < n_vocab:
            raise InvalidInput(f"logit_bias: token id {token} is outside the vocabulary of {n_vocab}")
        if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:  # also refuses NaN
            raise InvalidInput(f"logit_bias: bias {bias} for token {token} is outside -100..100")


def apply_logit_bias(logits: npt.NDArray[np.float32],
                     bias: Sequence[tuple[int, float]]) -> npt.NDArray[np.float32]:
    """Add each bias to its token's logit (llama_sampler_init_logit_bias, first in llama.cpp's
    chain). Returns a new array when there is any bias; ids were checked by check_request."""
    if not bias:
        return logits
    out: npt.NDArray[np.float32] = logits.copy()
    ids = np.asarray([token for token, _ in bias], dtype=np.int64)
    out[ids] += np.asarray([value for _, value in bias], dtype=np.float32)
    return out


def apply_penalties(logits: npt.NDArray[np.float32], history: Sequence[int],
                    params: SamplingParams) -> npt.NDArray[np.float32]:
    """llama.cpp's penalties sampler: over the last `repeat_last_n` tokens of history, a token
    seen `count` times has its logit divided (positive) or multiplied (negative) by the repeat
    penalty, then lowered by count * frequency_penalty + presence_penalty. float32 throughout,
    as llama.cpp computes it. Returns a new array; the input is left untouched."""
    last_n = params.repeat_last_n
    if last_n <= 0 or not history or not params.penalised:
        return logits
    window = np.asarray(history[-last_n:], dtype=np.int64)
    window = window[(window >= 0) & (window < logits.shape[0])]
    ids, counts = np.unique(window, return_counts=True)
    out: npt.NDArray[np.float32] = logits.copy()
    values = out[ids]
    if params.repeat_penalty != 1.0:
        penalty = np.float32(params.repeat_penalty)
        values = np.where(values > 0, values / penalty, values * penalty).astype(np.float32)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        values = values - (counts.astype(np.float32) * np.float32(params.frequency_penalty)
                           + np.float32(params.presence_penalty))
    out[ids] = values
    return out


def apply_repeat_penalty(
    logits: npt.NDArray[np.float32], history: Sequence[int], penalty: float, last_n: int
) -> npt.NDArray[np.float32]:
    """The repeat penalty alone (apply_penalties with no frequency or presence penalty)."""
    return apply_penalties(logits, history, SamplingParams(repeat_penalty=penalty, repeat_last_n=last_n))


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = logits.astype(np.float64) - _log_sum_exp(logits)
    return result


def _log_sum_exp(logits: npt.NDArray[np.float32]) -> float:
    x = logits.astype(np.float64)  # float64: a logprob is then exact to far below the 1e-4 promised
    m = float(x.max())
    return m + float(np.log(np.exp(x - m).sum()))


def top_logprobs(logits: npt.NDArray[np.float32], n: int) -> tuple[TopLogprob, ...]:
    """The `n` most likely tokens under the raw logits, most likely first, ties by token id
    (so the list never depends on a partition's order)."""
    return _top_of(logits, _log_sum_exp(logits), n)


def _top_of(logits: npt.NDArray[np.float32], lse: float, n: int) -> tuple[TopLogprob, ...]:
    if n <= 0:
        return ()
    n = min(n, logits.shape[0])
    # The order of logprobs is the order of logits: choose on the logits, convert only the n chosen.
    candidates = np.argpartition(-logits, n - 1)[:n] if n < logits.shape[0] else np.arange(n)
    # A tie at the cut may leave out a smaller id: take every token at the cut's value, then sort.
    candidates = np.flatnonzero(logits >= logits[candidates].min())
    ordered = candidates[np.lexsort((candidates, -logits[candidates]))][:n]
    return tuple(TopLogprob(token_id=int(t), logprob=float(logits[t]) - lse) for t in ordered)


def _softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(x - x.max())
    result: npt.NDArray[np.float64] = e / e.sum()
    return result


def token_logprob(logits: npt.NDArray[np.float32], token_id: int) -> float:
    return float(logits[token_id]) - _log_sum_exp(logits)


def _draw(seed: int, position: int) -> float:
    # A fresh generator per (seed, position): the draw never depends on what came before.
    return float(np.random.Generator(np.random.PCG64([seed & (2**64 - 1), position])).random())


def sample(
    logits: npt.NDArray[np.float32],
    params: SamplingParams,
    history: Sequence[int],
    position: int,
    want_logprob: bool = False,
    n_top_logprobs: int = 0,
    raw_logits: npt.NDArray[np.float32] | None = None,
) -> Sampled:
    """Choose the token at `position` from the logits of the previous position.

    `raw_logits`: the model's own logits when `logits` were already changed by the caller (a
    grammar mask); log-probabilities are always computed from the model's own."""
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {logits.shape}")
    model_logits = logits if raw_logits is None else raw_logits
    penalised = apply_penalties(apply_logit_bias(logits, params.logit_bias), history, params)
    if params.greedy:
        token = int(np.argmax(penalised))
    else:
        token = _sample_stochastic(penalised, params, position)
    if not want_logprob and n_top_logprobs <= 0:
        return Sampled(token_id=token, logprob=0.0)
    lse = _log_sum_exp(model_logits)  # once, for the chosen token and its alternatives
    return Sampled(token_id=token, logprob=float(model_logits[token]) - lse,
                   top=_top_of(model_logits, lse, n_top_logprobs))


def _sample_stochastic(logits: npt.NDArray[np.float32], params: SamplingParams, position: int) -> int:
    n_vocab = logits.shape[0]
    k = params.top_k if 0 < params.top_k < n_vocab else n_vocab
    if k < n_vocab:
        candidates = np.argpartition(-logits, k - 1)[:k]
    else:
        candidates = np.arange(n_vocab)
    # Sort by logit descending, ties by token id, so the order never depends on the partition.
    candidates = candidates[np.lexsort((candidates, -logits[candidates]))]
    cand_logits = logits[candidates].astype(np.float64)

    probs = _softmax(cand_logits)
    keep = len(candidates)
    if 0.0 < params.top_p < 1.0:
        cumulative = np.cumsum(probs)
        keep = min(keep, int(np.searchsorted(cumulative, params.top_p)) + 1)
    if params.min_p > 0.0:
        keep = min(keep, max(1, int(np.count_nonzero(probs >= params.min_p * probs[0]))))
    candidates = candidates[:keep]

    final = _softmax(cand_logits[:keep] / params.temperature)
    cumulative = np.cumsum(final)
    index = int(np.searchsorted(cumulative, _draw(params.seed, position) * cumulative[-1], side="right"))
    return int(candidates[min(index, keep - 1)])
