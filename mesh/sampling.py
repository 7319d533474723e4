"""Token sampling as a pure function of (logits, params, history, position).

The same function runs on a replica node and on the last stage of a pipeline, so a
session replayed onto another placement draws the same tokens: the random draw for
position p comes from a generator seeded with (seed, p), never from shared state.

The order of the filters follows llama.cpp's default chain: repetition penalty,
top-k, top-p, min-p (on the untempered distribution), then temperature and the draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mesh.types import SamplingParams


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float  # log-probability under the model's own (untempered) distribution


def apply_repeat_penalty(
    logits: npt.NDArray[np.float32], history: Sequence[int], penalty: float, last_n: int
) -> npt.NDArray[np.float32]:
    """Penalise tokens seen in the last `last_n` of history, as llama.cpp does (divide positive
    logits, multiply negative ones). Returns a new array; the input is left untouched."""
    if penalty == 1.0 or last_n <= 0 or not history:
        return logits
    ids = np.unique(np.asarray(history[-last_n:], dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    out = logits.copy()
    values = out[ids]
    out[ids] = np.where(values > 0, values / penalty, values * penalty)
    penalised: npt.NDArray[np.float32] = out.astype(np.float32, copy=False)
    return penalised


def _softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(x - x.max())
    result: npt.NDArray[np.float64] = e / e.sum()
    return result


def token_logprob(logits: npt.NDArray[np.float32], token_id: int) -> float:
    x = logits.astype(np.float64)
    m = x.max()
    return float(x[token_id] - m - np.log(np.exp(x - m).sum()))


def _draw(seed: int, position: int) -> float:
    # A fresh generator per (seed, position): the draw never depends on what came before.
    return float(np.random.Generator(np.random.PCG64([seed & (2**64 - 1), position])).random())


def sample(
    logits: npt.NDArray[np.float32],
    params: SamplingParams,
    history: Sequence[int],
    position: int,
    want_logprob: bool = False,
) -> Sampled:
    """Choose the token at `position` from the logits of the previous position."""
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {logits.shape}")
    penalised = apply_repeat_penalty(logits, history, params.repeat_penalty, params.repeat_last_n)
    if params.greedy:
        token = int(np.argmax(penalised))
    else:
        token = _sample_stochastic(penalised, params, position)
    logprob = token_logprob(logits, token) if want_logprob else 0.0
    return Sampled(token_id=token, logprob=logprob)


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
