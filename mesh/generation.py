"""The one generation loop: prefill, replay, decode, stop and length.

A whole-model replica (node.engines.llamacpp) and a pipeline (mesh.pipeline) differ only in
how one step is computed, so both hand this loop a `Stepper` and take the TokenEvents it
yields. What the loop guarantees, for both:
- the prompt is evaluated in PREFILL_CHUNK batches (llama.cpp's own n_batch, so the numbers,
  and the output at temperature 0, are llama.cpp's), then one token per step;
- a failover replay evaluates the already generated tokens one per step, exactly as they were
  first evaluated, and marks them generated so a grammar is advanced over them, so the
  continuation is what the failed attempt would have produced;
- a step whose output nobody reads (a prefill chunk or replayed token that another step
  follows before the next token is chosen) is fed `ahead`: a pipeline sends it on without
  waiting for it, so the stages work on consecutive chunks at once, and the steps, and so the
  numbers, stay exactly those of a run that waited;
- a stream ends on a stop token ("stop"), at max_tokens or at the end of the context
  ("length"), or, with no event, as soon as `cancelled()` turns true between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Protocol

from mesh.sampling import Sampled
from mesh.types import FinishReason, GenerationRequest, TokenEvent

PREFILL_CHUNK = 512  # llama.cpp's default n_batch: the prompt is evaluated in the same batches


class Stepper(Protocol):
    """One forward pass at a time over one session, blocking."""

    def feed(self, tokens: Sequence[int], start: int, history: Sequence[int], generated: bool,
             ahead: bool = False) -> None:
        """Evaluate `tokens` at positions start, start+1, ... `history` is every token so far,
        these included. `generated`: they were generated (or replayed), not prompt. `ahead`:
        another feed follows before `choose`, so this one's output is never read (a stepper
        may return before the step is done; a failure then surfaces at a later feed)."""

    def choose(self, history: Sequence[int]) -> Sampled:
        """The token at position len(history), from the logits of the last `feed`."""


def _never() -> bool:
    return False


def generate_tokens(request: GenerationRequest, n_ctx: int, stepper: Stepper,
                    cancelled: Callable[[], bool] = _never) -> Generator[TokenEvent, None, None]:
    """The tokens of one request; the caller has validated it (replay_tokens fewer than
    max_tokens, prompt and replay inside the context)."""
    history = list(request.prompt_tokens)
    replay = request.replay_tokens
    for lo in range(0, len(history), PREFILL_CHUNK):
        last_chunk = lo + PREFILL_CHUNK >= len(history)
        stepper.feed(history[lo:lo + PREFILL_CHUNK], lo, history, generated=False,
                     ahead=not last_chunk or bool(replay))
    for index, token in enumerate(replay):  # one per step, as they were first generated
        if cancelled():
            return
        history.append(token)
        stepper.feed([token], len(history) - 1, history, generated=True, ahead=index < len(replay) - 1)
    produced = len(request.replay_tokens)
    # At least one token even past max_tokens (a replay as long as it, which only the replica
    # refuses up front): every stream that is not cancelled ends with a finish_reason.
    while not cancelled():
        position = len(history)
        chosen = stepper.choose(history)
        history.append(chosen.token_id)
        produced += 1
        finish: FinishReason | None = None
        if chosen.token_id in request.stop_token_ids:
            finish = "stop"
        elif produced >= request.max_tokens or position + 1 >= n_ctx:
            finish = "length"
        yield TokenEvent(token_id=chosen.token_id, position=position, logprob=chosen.logprob,
                         finish_reason=finish, top_logprobs=chosen.top)
        if finish is not None:
            return
        stepper.feed([chosen.token_id], position, history, generated=True)
