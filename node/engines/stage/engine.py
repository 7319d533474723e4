"""StageEngine: runs layers [first, last) of a GGUF model for many sessions on ggml.

Reads like the algorithm: `forward` validates and splits the input into chunks,
`_step` runs one chunk through a (cached or fresh) graph. All compute is serialized
by one lock: the CPU backend already uses every thread it is given for one graph.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh.errors import InvalidInput, ModelError
from node.engines import ggml
from node.engines.stage.config import ModelArgs
from node.engines.stage.graph import KvCache, StepGraph, build_step, new_kv_cache
from node.engines.stage.sessions import SlotTable
from node.engines.stage.weights import StageWeights, load_weights, read_header

log = logging.getLogger(__name__)

MAX_CHUNK = 512  # tokens per graph; longer inputs are split (llama.cpp's default n_batch)
KV_PAD = 256  # attend over the first multiple of 256 cells, as llama.cpp pads n_kv (keeps graphs reusable)
_DECODE_GRAPH_CACHE = 32  # decode graphs kept, keyed by (slot, n_kv)


class _DecodeInputs:
    """Host copies of a cached decode graph's inputs, made once: a step only writes its
    position into them, instead of building index arrays and a mask for every token."""

    def __init__(self, slot: int, n_ctx: int, n_embd_kv: int, n_kv: int, n_swa: int) -> None:
        self.pos = np.zeros(1, dtype=np.int32)
        self.k_idx = np.zeros(1, dtype=np.int64)
        self._k_base = slot * n_ctx
        # element (slot, e, position) of the V cache, laid out [slot][e][cell]
        self._v_base = slot * n_ctx * n_embd_kv + np.arange(n_embd_kv, dtype=np.int64) * n_ctx
        self.v_idx = self._v_base.copy()
        self.mask = np.full(n_kv, -np.inf, dtype=np.float32)
        self._visible = 0  # mask cells [0, _visible) are 0, the rest -inf
        self._n_swa = n_swa
        # sliding-window layers see only cells (position - n_swa, position]
        self.mask_swa = np.full(n_kv, -np.inf, dtype=np.float32) if n_swa > 0 else None

    def at(self, position: int) -> None:
        self.pos[0] = position
        self.k_idx[0] = self._k_base + position
        np.add(self._v_base, position, out=self.v_idx)
        visible = position + 1
        if visible > self._visible:
            self.mask[self._visible:visible] = 0.0
        elif visible < self._visible:
            self.mask[visible:self._visible] = -np.inf
        self._visible = visible
        if self.mask_swa is not None:
            np.copyto(self.mask_swa, self.mask)
            self.mask_swa[:max(0, position - self._n_swa + 1)] = -np.inf


@dataclass(frozen=True)
class StageMemory:
    weight_bytes: int
    kv_cache_bytes: int
    compute_bytes: int


class StageEngine:
    def __init__(self, path: Path, args: ModelArgs, first: int, last_exclusive: int, weights: StageWeights,
                 kv: KvCache, backend: ggml.CpuBackend, allocator: ggml.GraphAllocator) -> None:
        self.path = path
        self.args = args
        self.first = first
        self.last_exclusive = last_exclusive
        self.is_first = first == 0
        self.is_last = last_exclusive == args.n_layer
        self.n_embd = args.n_embd
        self.n_vocab = args.n_vocab
        self.n_layer = args.n_layer
        self.n_ctx = kv.n_ctx
        self._w = weights
        self._kv = kv
        self._backend = backend
        self._alloc = allocator
        self._slots = SlotTable(kv.slots)
        self._lock = threading.Lock()
        self._decode_graphs: OrderedDict[tuple[int, int], tuple[StepGraph, _DecodeInputs]] = OrderedDict()
        self._allocated: StepGraph | None = None  # the cached graph whose tensors the compute buffer holds
        self._closed = False
        self.max_chunk = MAX_CHUNK
        self.memory = StageMemory(weight_bytes=weights.buffer_bytes,
                                  kv_cache_bytes=kv.buffer.size, compute_bytes=allocator.size)

    # ---------------------------------------------------------------- construction

    @classmethod
    def load(cls, path: Path, first: int, last_exclusive: int, *, n_ctx: int, slots: int,
             threads: int, max_chunk: int = MAX_CHUNK) -> StageEngine:
        args, tensors = read_header(path)
        if not 0 <= first < last_exclusive <= args.n_layer:
            raise InvalidInput(f"layer range [{first}, {last_exclusive}) is not inside [0, {args.n_layer})")
        if n_ctx < 1 or slots < 1 or threads < 1 or not 1 <= max_chunk <= MAX_CHUNK:
            raise InvalidInput(f"n_ctx, slots and threads must all be >= 1, max_chunk 1..{MAX_CHUNK}")
        backend = ggml.CpuBackend(threads)
        weights: StageWeights | None = None
        kv: KvCache | None = None
        allocator: ggml.GraphAllocator | None = None
        try:
            weights = load_weights(path, args, tensors, first, last_exclusive, backend)
            kv = new_kv_cache(args, last_exclusive - first, n_ctx, slots, backend)
            allocator = ggml.GraphAllocator(backend)
            # reserve for the largest step (a full chunk attending over the whole context), so that the
            # compute buffer never grows later and memory is reported up front
            worst = build_step(args, weights, kv, n_tokens=min(max_chunk, n_ctx), n_kv=n_ctx, slot=0,
                               is_first=first == 0, is_last=last_exclusive == args.n_layer)
            try:
                allocator.reserve(worst.graph)
            finally:
                worst.close()
        except BaseException:
            for res in (allocator, kv, weights, backend):
                if res is not None:
                    res.close()
            raise
        engine = cls(path, args, first, last_exclusive, weights, kv, backend, allocator)
        # Smaller chunks shrink the compute buffer (it holds a chunk x context attention matrix)
        # so a stage fits a small device; prompts then take more, smaller steps.
        engine.max_chunk = max_chunk
        log.info("stage [%d, %d) of %s (%s): weights %.1f MB, KV %.1f MB (%d slots x %d), compute %.1f MB",
                 first, last_exclusive, path.name, args.arch, engine.memory.weight_bytes / 1e6,
                 engine.memory.kv_cache_bytes / 1e6, slots, n_ctx, engine.memory.compute_bytes / 1e6)
        return engine

    # ---------------------------------------------------------------- public API

    @property
    def threads(self) -> int:
        return self._backend.threads

    def set_threads(self, threads: int) -> None:
        with self._lock:
            self._backend.set_threads(threads)

    def forward(self, session_id: str, start_position: int, *, tokens: Sequence[int] | None = None,
                hidden: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
        """Run tokens (first stage) or hidden states [n, n_embd] (later stages) at positions
        start_position.. of a session. Returns hidden [n, n_embd] float32, or for the last stage
        the logits of the last token, [n_vocab] float32. A start_position below the session's
        length truncates the session there first (replay)."""
        data = self._validate_input(tokens, hidden)
        n = len(data)
        if not isinstance(session_id, str) or not session_id:
            raise InvalidInput("session_id must be a non-empty string")
        if not isinstance(start_position, int) or start_position < 0:
            raise InvalidInput(f"start_position must be a non-negative int, got {start_position!r}")
        with self._lock:
            if self._closed:
                raise ModelError("stage engine is closed")
            state = self._slots.get(session_id)
            length = 0 if state is None else state.length
            if start_position > length:
                raise InvalidInput(f"session {session_id!r} holds {length} positions; start_position "
                                   f"{start_position} would leave a gap")
            if start_position + n > self.n_ctx:
                raise InvalidInput(f"positions up to {start_position + n} exceed this stage's context of "
                                   f"{self.n_ctx}")
            if state is None:
                state = self._slots.open(session_id)
            if threads is not None and threads != self._backend.threads:
                # Decode and prefill may want different thread counts (see node.stage_host).
                self._backend.set_threads(threads)
            state.length = start_position  # truncation: later cells are masked and then overwritten
            outputs: list[np.ndarray] = []
            for lo in range(0, n, self.max_chunk):
                chunk = data[lo:lo + self.max_chunk]
                outputs.append(self._step(state.slot, start_position + lo, chunk))
                state.length = start_position + lo + len(chunk)
            if self.is_last:
                return outputs[-1]
            return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=0)

    def release(self, session_id: str) -> bool:
        with self._lock:
            return self._slots.release(session_id)

    def sessions(self) -> int:
        with self._lock:
            return len(self._slots)

    def session_length(self, session_id: str) -> int | None:
        with self._lock:
            state = self._slots.get(session_id)
            return None if state is None else state.length

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for g, _inputs in self._decode_graphs.values():
                g.close()
            self._decode_graphs.clear()
            self._alloc.close()
            self._kv.close()
            self._w.close()
            self._backend.close()

    def __enter__(self) -> StageEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _validate_input(self, tokens: Sequence[int] | None, hidden: np.ndarray | None) -> np.ndarray:
        if self.is_first:
            if hidden is not None or tokens is None:
                raise InvalidInput("the first stage takes token ids, not hidden states")
            try:
                ids = np.asarray(tokens, dtype=np.int64)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInput(f"token ids must be integers: {exc}") from exc
            if ids.ndim != 1 or ids.size == 0:
                raise InvalidInput("tokens must be a non-empty 1-D sequence")
            if ids.min() < 0 or ids.max() >= self.n_vocab:
                raise InvalidInput(f"token ids must lie in [0, {self.n_vocab})")
            return ids.astype(np.int32)
        if tokens is not None or hidden is None:
            raise InvalidInput("a non-first stage takes hidden states, not token ids")
        if not isinstance(hidden, np.ndarray) or hidden.ndim != 2 or hidden.shape[1] != self.n_embd \
                or hidden.shape[0] == 0:
            got = getattr(hidden, "shape", type(hidden).__name__)
            raise InvalidInput(f"hidden must have shape [n_tokens, {self.n_embd}], got {got}")
        if hidden.dtype != np.float32:
            raise InvalidInput(f"hidden must be float32, got {hidden.dtype}")
        return np.ascontiguousarray(hidden)

    def _n_kv(self, end: int) -> int:
        return min(self.n_ctx, max(KV_PAD, -(-end // KV_PAD) * KV_PAD))

    def _decode_graph(self, n_kv: int, slot: int) -> tuple[StepGraph, _DecodeInputs]:
        """The cached single-token graph for (slot, n_kv), built on first use (LRU)."""
        key = (slot, n_kv)
        found = self._decode_graphs.get(key)
        if found is not None:
            self._decode_graphs.move_to_end(key)
            return found
        g = build_step(self.args, self._w, self._kv, n_tokens=1, n_kv=n_kv, slot=slot,
                       is_first=self.is_first, is_last=self.is_last)
        found = (g, _DecodeInputs(slot, self.n_ctx, self.args.n_embd_kv, n_kv,
                                  self.args.n_swa if g.mask_swa is not None else 0))
        self._decode_graphs[key] = found
        if len(self._decode_graphs) > _DECODE_GRAPH_CACHE:
            _, (old, _inputs) = self._decode_graphs.popitem(last=False)
            if self._allocated is old:
                self._allocated = None
            old.close()
        return found

    def _step(self, slot: int, start: int, data: np.ndarray) -> np.ndarray:
        n = len(data)
        n_kv = self._n_kv(start + n)
        if n == 1:
            g, inputs = self._decode_graph(n_kv, slot)
            # Like llama.cpp when it reuses a graph: the compute buffer still holds this graph's
            # tensors if no other graph was allocated since, so planning them again is skipped.
            if self._allocated is not g:
                self._alloc.alloc(g.graph)
                self._allocated = g
            inputs.at(start)
            ggml.tensor_set(g.inp, data)
            ggml.tensor_set(g.pos, inputs.pos)
            ggml.tensor_set(g.k_idx, inputs.k_idx)
            ggml.tensor_set(g.v_idx, inputs.v_idx)
            if g.mask is not None:
                ggml.tensor_set(g.mask, inputs.mask)
            if g.mask_swa is not None and inputs.mask_swa is not None:
                ggml.tensor_set(g.mask_swa, inputs.mask_swa)
            return self._compute(g, 1)
        g = build_step(self.args, self._w, self._kv, n_tokens=n, n_kv=n_kv, slot=slot,
                       is_first=self.is_first, is_last=self.is_last)
        try:
            self._allocated = None  # this graph's tensors take over the compute buffer
            self._alloc.alloc(g.graph)
            positions = np.arange(start, start + n, dtype=np.int32)
            ggml.tensor_set(g.inp, data)
            ggml.tensor_set(g.pos, positions)
            e, n_ctx = self.args.n_embd_kv, self.n_ctx
            ggml.tensor_set(g.k_idx, positions.astype(np.int64) + slot * n_ctx)
            v_idx = (slot * n_ctx * e + np.arange(e, dtype=np.int64)[None, :] * n_ctx
                     + positions.astype(np.int64)[:, None])
            ggml.tensor_set(g.v_idx, np.ascontiguousarray(v_idx.ravel()))
            cells = np.arange(n_kv, dtype=np.int32)
            visible = cells[None, :] <= positions[:, None]
            mask = np.where(visible, np.float32(0.0), np.float32(-np.inf))
            if g.mask is not None:
                ggml.tensor_set(g.mask, mask.astype(np.float32))
            if g.mask_swa is not None:
                in_window = visible & (positions[:, None] - cells[None, :] < self.args.n_swa)
                ggml.tensor_set(g.mask_swa, np.where(in_window, np.float32(0.0), np.float32(-np.inf)))
            return self._compute(g, n)
        finally:
            g.close()

    def _compute(self, g: StepGraph, n: int) -> np.ndarray:
        self._backend.compute(g.graph)
        if self.is_last:
            return ggml.tensor_get(g.out, np.empty(self.n_vocab, dtype=np.float32))
        return ggml.tensor_get(g.out, np.empty((n, self.n_embd), dtype=np.float32))
