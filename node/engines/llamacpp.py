"""Whole-model replica engine on llama.cpp, every session of it decoding in one batch.

llama.cpp runs the forward pass (prefill in n_batch chunks, then one token per step); the
token is chosen by mesh.sampling so that a replica and a pipeline draw identical tokens for
the same session. The `slots` sessions are sequences of one llama.cpp context
(node.engines.decode_batch): their single-token steps go through one `llama_decode`
together, each row's numbers those of the same session decoded alone.

Determinism over prefix caching: llama.cpp's kernels give slightly different numbers
for a token evaluated alone and the same token evaluated inside a prompt chunk, which is
enough to flip a greedy choice. So every request is evaluated exactly as a fresh llama.cpp
run would: the prompt in n_batch chunks, then one token per step, and a failover replay
evaluates the already generated tokens one per step too. The output then depends only
on the request, never on which node served it, what that node served before, or what it
serves beside it.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from mesh.constraints import Matcher
from mesh.errors import CapacityExhausted, InvalidInput, ModelError, Unavailable
from mesh.generation import generate_tokens
from mesh.sampling import Sampled, check_request, sample
from mesh.template_check import check_model_templates
from mesh.types import GenerationRequest, TokenEvent
from node.compute import ComputeThread
from node.engines.decode_batch import DecodeBatch

log = logging.getLogger(__name__)


class LlamaCppEngine:
    """Generates whole streams on llama.cpp, `slots` at a time, their steps batched.

    The llama.cpp calls run on `compute` (the node's one compute thread; without one the
    engine starts its own); the sessions' loops run on the engine's own threads."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, slots: int,
                 compute: ComputeThread | None = None, on_step: Callable[[int], None] = lambda _rows: None) -> None:
        if slots < 1:
            raise ModelError("a replica engine needs at least one slot")
        self.model_path = model_path
        self.n_ctx = n_ctx
        # Before llama.cpp: this engine compiles no chat template, but the embedding context
        # opened beside it (llama-cpp-python's Llama(), node.engines.embedder) compiles every
        # one in the file, so a template that would blow up its compiler is refused here, at
        # load (CVE-2024-34359 was llama-cpp-python rendering one outside a sandbox).
        check_model_templates(model_path)
        self._own_compute = compute is None
        self._compute = compute or ComputeThread("replica-compute")
        try:
            self._batch = DecodeBatch(model_path, n_ctx=n_ctx, threads=threads, n_seqs=slots,
                                      compute=self._compute, on_step=on_step)
        except BaseException:
            if self._own_compute:
                self._compute.close()
            raise
        self.n_vocab = self._batch.n_vocab
        self.metadata: dict[str, str] = self._batch.metadata  # the GGUF's keys, as text
        self.threads = threads
        self.slots = slots
        # Sequence ids of the context, the lowest handed out first: the batch decodes fastest
        # when the ids decoding together are consecutive (see node.engines.decode_batch).
        self._free = list(range(slots))
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()  # sessions' threads (see stream)
        self._closed = False

    def close(self) -> None:
        """Free llama.cpp's context and model, once the streams in flight have ended."""
        with self._lock:
            self._closed = True
            running = list(self._threads)
        for thread in running:
            thread.join()
        self._batch.close()
        if self._own_compute:
            self._compute.close()

    def _acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise CapacityExhausted("no free generation slot")
            return heapq.heappop(self._free)

    def _release(self, seq: int) -> None:
        self._batch.leave(seq)
        with self._lock:
            heapq.heappush(self._free, seq)

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
        """Blocking generator of tokens; run it on a thread of its own, not on the compute
        thread (its steps wait for that thread). Stops early when `cancelled()` turns true,
        and always returns its slot."""
        self.validate(request)
        seq = self._acquire()
        try:
            # Here on the session's thread, not in validate(): compiling a large grammar takes a while.
            matcher = Matcher.for_model(self.model_path, request.constraint) if request.constraint else None
            log.debug("request %s: %d prompt tokens, %d to replay", request.request_id,
                      len(request.prompt_tokens), len(request.replay_tokens))
            yield from generate_tokens(request, self.n_ctx, _ReplicaStepper(self._batch, seq, request, matcher),
                                       cancelled)
        finally:
            self._release(seq)

    def stream(self, request: GenerationRequest, cancelled: Callable[[], bool],
               emit: Callable[[TokenEvent], None]) -> Future[None]:
        """`generate` on a thread of its own (it ends with the stream), each event passed to
        `emit`; the future ends with the stream, with its exception if it failed. A request
        that is invalid raises here, at once."""
        self.validate(request)
        done: Future[None] = Future()
        done.set_running_or_notify_cancel()

        def run() -> None:
            try:
                for event in self.generate(request, cancelled):
                    emit(event)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the stream
                done.set_exception(exc)
            else:
                done.set_result(None)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"replica-session-{request.request_id}", daemon=True)
        with self._lock:
            if self._closed:
                raise Unavailable("this replica was released; retry on another placement")
            self._threads.add(thread)
        thread.start()
        return done


class _ReplicaStepper:
    """The generation loop's steps on one sequence of the batch; the token is sampled here,
    under the request's grammar when it has one."""

    def __init__(self, batch: DecodeBatch, seq: int, request: GenerationRequest, matcher: Matcher | None) -> None:
        self._batch = batch
        self._seq = seq
        self._request = request
        self._matcher = matcher
        self._fresh = True  # the first step clears what the sequence held for an earlier session
        self._logits: np.ndarray | None = None

    def feed(self, tokens: Sequence[int], start: int, history: Sequence[int], generated: bool,
             ahead: bool = False) -> None:  # one process: nothing to overlap, `ahead` changes nothing
        if generated and self._matcher is not None:
            self._matcher.consume(tokens)  # a replay's mask is the first run's
        self._logits = self._batch.step(self._seq, tokens, start, fresh=self._fresh)
        self._fresh = False

    def choose(self, history: Sequence[int]) -> Sampled:
        request = self._request
        assert self._logits is not None, "choose before any feed"
        logits = self._logits
        masked = logits if self._matcher is None else self._matcher.mask(logits)
        return sample(masked, request.sampling, history, len(history), request.logprobs, request.top_logprobs,
                      raw_logits=logits)
