"""Whole-model replica engine on llama-cpp-python.

llama.cpp runs the forward pass (prefill in n_batch chunks, then one token per step);
the token is chosen by mesh.sampling so that a replica and a pipeline draw identical
tokens for the same session. Each slot is one llama.cpp context over the same mmap'd
weights.

Determinism over prefix caching: llama.cpp's kernels give slightly different numbers
for a token evaluated alone and the same token evaluated inside a batch, which is enough
to flip a greedy choice. So every request is evaluated exactly as a fresh llama.cpp run
would: the prompt in n_batch chunks, then one token per step, and a failover replay
evaluates the already generated tokens one per step too. The output then depends only
on the request, never on which node served it or what that node served before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from mesh.constraints import Matcher
from mesh.errors import CapacityExhausted, InvalidInput, ModelError
from mesh.generation import PREFILL_CHUNK, generate_tokens
from mesh.sampling import Sampled, check_request, sample
from mesh.template_check import check_model_templates
from mesh.types import GenerationRequest, TokenEvent

log = logging.getLogger(__name__)


def _no_chat_formatting(**_kwargs: Any) -> NoReturn:
    """llama-cpp-python's chat handler, never used: this engine takes token ids, and chats are
    rendered by the gateway's sandboxed renderer (mesh.tokenizer)."""
    raise InvalidInput("the replica engine takes token ids; it formats no chats")


class _Slot:
    def __init__(self, model_path: Path, n_ctx: int, threads: int) -> None:
        from llama_cpp import Llama  # heavy import kept out of module import

        self.llm = Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=PREFILL_CHUNK,  # the generation loop's chunks: llama.cpp's default, so outputs are its own
            n_threads=threads,
            n_threads_batch=threads,
            # pinned to what the stage engine matches (llama-cpp-python's defaults today): attention
            # by mul_mat + soft_max, and a sliding-window cache as long as the context, whose cells
            # hold the positions in order (a shorter one wraps around and sums in another order)
            flash_attn=False,
            swa_full=True,
            # so that llama-cpp-python neither guesses a chat format nor renders the file's
            # template itself (it still compiles it: see the check in LlamaCppEngine)
            chat_handler=_no_chat_formatting,
            verbose=False,
        )
        self.n_vocab = int(self.llm.n_vocab())

    def last_logits(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits: np.ndarray = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()
        return logits


class LlamaCppEngine:
    """Generates whole streams on llama.cpp, `slots` at a time."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, slots: int) -> None:
        if slots < 1:
            raise ModelError("a replica engine needs at least one slot")
        self.model_path = model_path
        self.n_ctx = n_ctx
        # Before llama.cpp: Llama() compiles every chat template in the file (CVE-2024-34359 was
        # its rendering of one outside a sandbox; compiling folds constants with no budget).
        check_model_templates(model_path)
        try:
            self._free = [_Slot(model_path, n_ctx, threads) for _ in range(slots)]
        except ValueError as exc:  # llama-cpp-python reports load failures as ValueError
            raise ModelError(f"llama.cpp could not load {model_path}: {exc}") from exc
        self.n_vocab = self._free[0].n_vocab
        self.metadata: dict[str, str] = dict(self._free[0].llm.metadata or {})  # the GGUF's keys, as text
        self.threads = threads
        self.slots = slots
        self._lock = threading.Lock()

    def _acquire(self) -> _Slot:
        with self._lock:
            if not self._free:
                raise CapacityExhausted("no free generation slot")
            return self._free.pop()

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            self._free.append(slot)

    def validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_tokens
        if not prompt:
            raise InvalidInput("prompt_tokens is empty")
        if len(prompt) >= self.n_ctx:
            raise InvalidInput(f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}")
        bad = [t for t in prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidInput(f"token id {bad[0]} is outside the vocabulary of {self.n_vocab}")
        if request.max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1")
        if len(request.replay_tokens) >= request.max_tokens:
            raise InvalidInput("replay_tokens must be fewer than max_tokens")
        if len(prompt) + len(request.replay_tokens) >= self.n_ctx:
            raise InvalidInput("prompt and replayed tokens do not fit the context")
        bad = [t for t in request.replay_tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidInput(f"replay token id {bad[0]} is outside the vocabulary of {self.n_vocab}")
        check_request(request.sampling, request.top_logprobs, self.n_vocab)

    def generate(self, request: GenerationRequest, cancelled: Callable[[], bool]) -> Iterator[TokenEvent]:
        """Blocking generator of tokens; run it on a worker thread. Stops early when
        `cancelled()` turns true, and always returns its slot."""
        self.validate(request)
        slot = self._acquire()
        try:
            # Here on the worker thread, not in validate(): compiling a large grammar takes a while.
            matcher = Matcher.for_model(self.model_path, request.constraint) if request.constraint else None
            log.debug("request %s: %d prompt tokens, %d to replay", request.request_id,
                      len(request.prompt_tokens), len(request.replay_tokens))
            yield from generate_tokens(request, self.n_ctx, _ReplicaStepper(slot, request, matcher), cancelled)
        finally:
            self._release(slot)


class _ReplicaStepper:
    """The generation loop's steps on one llama.cpp slot; the token is sampled here, under
    the request's grammar when it has one."""

    def __init__(self, slot: _Slot, request: GenerationRequest, matcher: Matcher | None) -> None:
        self._slot = slot
        self._request = request
        self._matcher = matcher
        slot.llm.reset()  # type: ignore[no-untyped-call]

    def feed(self, tokens: Sequence[int], start: int, history: Sequence[int], generated: bool,
             ahead: bool = False) -> None:  # one process: nothing to overlap, `ahead` changes nothing
        if generated and self._matcher is not None:
            self._matcher.consume(tokens)  # a replay's mask is the first run's
        self._slot.llm.eval(tokens)

    def choose(self, history: Sequence[int]) -> Sampled:
        request = self._request
        logits = self._slot.last_logits()
        masked = logits if self._matcher is None else self._matcher.mask(logits)
        return sample(masked, request.sampling, history, len(history), request.logprobs, request.top_logprobs,
                      raw_logits=logits)
