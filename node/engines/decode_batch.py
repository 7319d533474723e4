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
fed in pieces, one piece between two of their steps, each piece costing about PIECE_TO_STEP
of their step's time; so their gap between tokens grows by that much, not by a whole
512-token chunk's time (1.5 s for the default model on 2 cores). Alone, a chunk goes in at
once, as llama.cpp's n_batch. The pieces change no number as long as none is shorter than
MIN_PIECE tokens: with the weights in plain buffers (mesh.llama_runtime), a 1,500-token prompt
fed in pieces of 16, 20, 32, 64, 100, 128 or 256 tokens (tails of 12 included) gave logits
bit-identical to 512-token chunks, default model and gemma-3; pieces of 8 or 10 did not on
gemma-3 (ggml takes another path for so few rows), nor single tokens on the default model.

Why a step may be cut into groups of rows: whether a row's numbers stay the same beside others
depends on the model's kernels. The default model's do at every row count tried (2-8);
gemma-3-270m's (Q4_K) were bit-identical for 2 and 4 rows but not for 8, which turned 2 of 8
greedy answers from their solo runs. So at load the batch measures it (`_invariant_rows`):
the same token on k sequences at once against one alone, for k = 2..n_seqs, and a step decodes
at most `max_rows` rows per llama_decode, the most for which every count up to it agreed bit
for bit. A model that agrees nowhere decodes one row at a time. This is a guard, not a proof:
on gemma-3 whether 8 rows agree depends on the values (the probe's tokens 1, 2, 3 then 4
agreed at 8 rows; 2, 651, 6037 then 1000 did not, and with that probe, steps of at most 7
rows, 8 of 8 greedy answers equalled their solo runs).

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
# The fewest tokens a prompt piece has (see the module's doc: fewer change the numbers).
MIN_PIECE = 16
# A piece costs about this many of the others' decode steps: their gap while a prompt is read
# is then ~2.5x the normal one. Larger pieces prefill faster and stall the others more.
PIECE_TO_STEP = 1.5


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
        self.max_rows = compute.call(self._invariant_rows).result()  # before any session: see the doc
        if self.max_rows < n_seqs:
            log.info("%s: rows beside more than %d others change its numbers: steps of at most %d rows",
                     model_path.name, self.max_rows - 1, self.max_rows)
        self._cond = threading.Condition()
        self._pending: list[_Row] = []
        self._scheduled = False
        self._decoding: set[int] = set()  # sessions between steps of their decode: a step waits for them
        self._feeding: list[_Row] = []  # prompt chunks fed in pieces, oldest first (compute thread only)
        # Measured on the compute thread: seconds of the last decode step and of a piece's token.
        self._step_s = 0.0
        self._token_s = 0.0

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
                n = self._piece(len(row.tokens) - row.fed) if others else len(row.tokens) - row.fed
                started = time.perf_counter()
                self._decode([row], n)
                self._token_s = (time.perf_counter() - started) / n
            self._feeding = [r for r in self._feeding if not r.done.done()]
            if singles:
                started = time.perf_counter()
                ordered = sorted(singles, key=lambda r: r.seq)
                for lo in range(0, len(ordered), self.max_rows):
                    group = ordered[lo:lo + self.max_rows]
                    self._decode(group, 1)
                    self._on_step(len(group))
                self._step_s = time.perf_counter() - started
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

    def _invariant_rows(self) -> int:
        """The most rows a step may decode together and give each row the numbers it gets
        alone (compute thread; the context is left empty)."""
        prompt = [t % self.n_vocab for t in (2, 651, 6037)]  # any ids: every sequence gets the same ones
        token = 1000 % self.n_vocab
        probe = [_Row(s, prompt, 0, False) for s in range(self.n_seqs)]
        try:
            for row in probe:
                self._decode([row], len(prompt))
            alone = _Row(0, [token], len(prompt), False)
            self._decode([alone], 1)
            want = alone.done.result()
            best = 1
            for k in range(2, self.n_seqs + 1):
                for s in range(k):
                    self._lc.llama_memory_seq_rm(self._memory, s, len(prompt), -1)
                rows = [_Row(s, [token], len(prompt), False) for s in range(k)]
                self._decode(rows, 1)
                if not all(np.array_equal(r.done.result(), want) for r in rows):
                    break
                best = k
            return best
        finally:
            self._lc.llama_memory_clear(self._memory, True)

    def _piece(self, left: int) -> int:
        """Tokens of a prompt chunk to feed between two decode steps of the others."""
        want = int(PIECE_TO_STEP * self._step_s / self._token_s) if self._step_s and self._token_s else MIN_PIECE
        want = max(MIN_PIECE, want)
        return left if left - want < MIN_PIECE else want  # never a tail shorter than MIN_PIECE

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
