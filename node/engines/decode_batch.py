"""One llama.cpp context that decodes every session of a replica together, one graph per step.

Each session is a sequence of the context, in its own KV stream (`kv_unified` off). Sessions
ask for steps from their own threads (`step`); the steps are run on the node's compute thread
(node.compute), where every session that is decoding a token waits for the others for at
most GATHER_S and then all of them go through one `llama_decode`, one row each.

Why the output stays that of a solo run: a decode row's numbers do not depend on the other
rows of its batch. Measured on this machine with the default model (8 sequences, 48 steps):
every logit bit-identical to the same sequence decoded alone. Matrix products take each
output element from one weight row and one activation row, whatever the number of rows, and
attention runs per stream over that sequence's own cells, which sit where a solo run puts
them. With one unified KV buffer instead, a sequence's cells interleave with the others',
attention sums in another order, and the same check gave 0 of 8 identical. A prompt chunk
(more than one token) is decoded on its own, never in a row beside others; only
single-token steps (decode, a replayed token, a one-token prompt) are batched.

Why a long prompt does not freeze the others: while other sessions decode, a prompt chunk is
fed in pieces of INTERLEAVE_TOKENS, one piece between two of their steps, so their gap
between tokens grows by a piece's time, not a whole 512-token chunk's. Alone, a chunk goes in
at once, as llama.cpp's n_batch. The pieces change no number: with the weights in plain
buffers (mesh.llama_runtime) a token's K, V and logits do not depend on how many tokens were
evaluated with it (measured: a 1,500-token prompt fed in pieces of 16 to 512 gave
bit-identical logits and the same greedy continuation, default model and gemma-3).

Why the rows go in sequence order: with one KV stream per sequence llama.cpp cuts a batch
into ubatches whose sequence ids run consecutively (split_equal, sequential), and each
ubatch is a graph of its own. Eight rows in arrival order took 70 ms a step here, the same
rows sorted 44 ms; rows of sequences 0, 2, 4, 6 took 38 ms, about four one-row steps (10 ms
each), against 26 ms for 0-3, which is why the engine hands out the lowest free sequence id.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import ModelError
from mesh.generation import PREFILL_CHUNK
from mesh.llama_runtime import model_params
from node.compute import ComputeThread

log = logging.getLogger(__name__)

# How long a step waits for the other decoding sessions' rows. They come back within a
# sampling's time (well under a millisecond for greedy); a session that is slower (a grammar
# mask, a lagging consumer) is left for the next step rather than holding everyone.
GATHER_S = 0.01
# A prompt's piece between two steps of other decoding sessions. On 2 cores a 32-token piece
# of the default model costs about what a 4-row decode step does, so the running sessions'
# longest gap stays about twice their normal one; larger pieces prefill faster and stall more.
INTERLEAVE_TOKENS = 32


@dataclass
class _Row:
    seq: int
    tokens: list[int]
    start: int
    fresh: bool  # the session's first step: its sequence's cells are cleared first
    done: Future[np.ndarray] = field(default_factory=Future)
    fed: int = 0  # tokens evaluated so far (a prompt chunk fed in pieces: see the module's doc)


def _metadata(model: Any) -> dict[str, str]:
    """The GGUF's key/value pairs as llama.cpp reads them, as text."""
    import llama_cpp as lc

    out: dict[str, str] = {}
    size = 1024
    buffer = ctypes.create_string_buffer(size)
    for i in range(lc.llama_model_meta_count(model)):
        texts = []
        for read in (lc.llama_model_meta_key_by_index, lc.llama_model_meta_val_str_by_index):
            n = read(model, i, buffer, size)
            if n >= size:
                size = n + 1
                buffer = ctypes.create_string_buffer(size)
                read(model, i, buffer, size)
            texts.append(buffer.value.decode("utf-8", errors="replace"))
        out[texts[0]] = texts[1]
    return out


def _free(lc: Any, batch: Any, ctx: Any, model: Any) -> None:
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)


class DecodeBatch:
    """`n_seqs` sequences of `n_ctx` tokens each over one copy of the weights."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, n_seqs: int,
                 compute: ComputeThread, on_step: Callable[[int], None] = lambda _rows: None) -> None:
        import llama_cpp as lc

        self._lc = lc
        self._compute = compute
        self._on_step = on_step
        lc.llama_backend_init()
        model = lc.llama_model_load_from_file(str(model_path).encode(), model_params())
        if not model:
            raise ModelError(f"llama.cpp could not load {model_path}")
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx * n_seqs  # llama.cpp gives each sequence n_ctx / n_seq_max
        params.n_batch = params.n_ubatch = PREFILL_CHUNK  # a prompt chunk in one ubatch, as a solo run
        params.n_seq_max = n_seqs
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # see the module's doc
        # what the stage engine matches (and llama-cpp-python's defaults today): attention by
        # mul_mat + soft_max, and a sliding-window cache as long as the context
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.swa_full = True
        ctx = lc.llama_init_from_model(model, params)
        if not ctx:
            lc.llama_model_free(model)
            raise ModelError(f"llama.cpp could not make a context of {n_seqs} x {n_ctx} tokens for {model_path}")
        self._model, self._ctx = model, ctx
        self._batch = lc.llama_batch_init(max(PREFILL_CHUNK, n_seqs), 0, 1)
        self._memory = lc.llama_get_memory(ctx)
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)))
        self.metadata = _metadata(model)
        self.n_seqs = n_seqs
        self._finalizer = weakref.finalize(self, _free, lc, self._batch, ctx, model)
        self._cond = threading.Condition()
        self._pending: list[_Row] = []
        self._scheduled = False
        self._decoding: set[int] = set()  # sessions between steps of their decode: a step waits for them
        self._feeding: list[_Row] = []  # prompt chunks fed in pieces, oldest first (compute thread only)

    def close(self) -> None:
        self._finalizer()

    # ------------------------------------------------------------------ sessions' side

    def step(self, seq: int, tokens: Sequence[int], start: int, fresh: bool = False) -> np.ndarray:
        """Blocking (from a session's thread, never the compute thread): evaluate `tokens` of
        sequence `seq` at positions start, start+1, ...; the logits after the last one."""
        row = _Row(seq, list(tokens), start, fresh)
        with self._cond:
            self._pending.append(row)
            self._cond.notify_all()
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            self._compute.call(self._run).add_done_callback(self._turn_refused)
        return row.done.result()

    def _turn_refused(self, turn: Future[None]) -> None:
        """The compute thread stopped before the step ran: the sessions waiting for it hear why
        instead of waiting forever."""
        error = turn.exception()
        if error is None:
            return
        with self._cond:
            rows, self._pending, self._scheduled = self._pending, [], False
        # (the compute thread is gone: no turn of it reads the chunks being fed any more)
        rows, self._feeding = [*rows, *self._feeding], []
        for row in rows:
            if not row.done.done():
                row.done.set_exception(error)

    def leave(self, seq: int) -> None:
        """The session ends (or stops decoding for a while): no step waits for it."""
        with self._cond:
            self._decoding.discard(seq)
            self._cond.notify_all()

    # ------------------------------------------------------------------ the compute thread

    def _gather(self) -> list[_Row]:
        deadline = time.monotonic() + GATHER_S
        with self._cond:
            while True:
                # (a session whose chunk is being fed waits for that, not to send a row)
                waiting_for = self._decoding - {r.seq for r in self._pending} - {r.seq for r in self._feeding}
                left = deadline - time.monotonic()
                if not waiting_for or left <= 0:
                    break
                self._cond.wait(left)
            rows, self._pending, self._scheduled = self._pending, [], False
        return rows

    def _run(self) -> None:
        rows = self._gather()
        singles = [r for r in rows if len(r.tokens) == 1]
        self._feeding.extend(r for r in rows if len(r.tokens) > 1)
        with self._cond:
            # Before any result is handed out: a session that gets its last token and leaves
            # at once must not be added back after it left (the next steps would wait for it).
            self._decoding.update(r.seq for r in rows)
            others = bool(singles) or bool(self._decoding - {r.seq for r in self._feeding})
        try:
            for row in rows:
                if row.fresh:
                    self._lc.llama_memory_seq_rm(self._memory, row.seq, -1, -1)
            # With others decoding, the oldest chunk gets one piece; alone, every chunk goes in whole.
            for row in self._feeding[:1] if others else list(self._feeding):
                piece = len(row.tokens) - row.fed if not others else min(INTERLEAVE_TOKENS, len(row.tokens) - row.fed)
                self._decode([row], piece)
            self._feeding = [r for r in self._feeding if not r.done.done()]
            if singles:
                self._decode(sorted(singles, key=lambda r: r.seq), 1)
                self._on_step(len(singles))
        except BaseException as exc:  # noqa: BLE001 - every waiting session hears of it
            for row in [*rows, *self._feeding]:
                if not row.done.done():
                    row.done.set_exception(exc)
            self._feeding = []
            return
        if self._feeding:  # the rest of a chunk goes on at the next turn, rows or not
            with self._cond:
                schedule, self._scheduled = not self._scheduled, True
            if schedule:
                self._compute.call(self._run).add_done_callback(self._turn_refused)

    def _decode(self, rows: list[_Row], n: int) -> None:
        """The next `n` tokens of each row in one llama_decode; a row that is then whole gets
        the logits after its last token."""
        lc, batch = self._lc, self._batch
        i = 0
        ending: list[_Row] = []
        for row in rows:
            last = row.fed + n == len(row.tokens)
            for offset in range(row.fed, row.fed + n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = row.tokens[offset], row.start + offset, 1
                batch.seq_id[i][0] = row.seq
                batch.logits[i] = last and offset == len(row.tokens) - 1
                i += 1
            if last:
                ending.append(row)
        batch.n_tokens = i
        code = lc.llama_decode(self._ctx, batch)
        if code != 0:
            raise ModelError(f"llama_decode failed ({code}) on {len(rows)} session(s), {i} token(s)")
        for row in rows:
            row.fed += n
        if not ending:
            return
        # llama.cpp puts the outputs back in batch order: every row's logits in one copy.
        pointer = lc.llama_get_logits(self._ctx)
        logits = np.ctypeslib.as_array(pointer, shape=(len(ending), self.n_vocab)).copy()
        for row, values in zip(ending, logits, strict=True):
            row.done.set_result(values)
