"""The whole-model replica a node may serve, loaded when a placement controller asks for it.

A node starts holding nothing (or, with `--role replica`, the replica at once). LoadModel
loads llama.cpp on the node's file within its memory budget; a release waits for the
streams in flight to end and takes no new ones meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mesh.errors import InvalidInput, NotFound, Unavailable
from mesh.types import EMBED_CONTEXT_TOKENS, ModelHeld, ModelSha
from node.activity import Activity
from node.budget import MemoryBudget
from node.compute import ComputeThread
from node.engines.embedder import Embedder, embedding_bytes
from node.engines.llamacpp import LlamaCppEngine
from node.stage_host import MAX_STAGE_CTX, LocalFile

log = logging.getLogger(__name__)


class ReplicaHost:
    def __init__(self, local: LocalFile, *, n_ctx: int, threads: int, slots: int, budget: MemoryBudget,
                 stage_only: bool, activity: Activity | None = None, compute: ComputeThread | None = None,
                 on_decode_step: Callable[[int], None] = lambda _rows: None) -> None:
        self._local = local
        self._compute = compute  # where the engine runs llama.cpp (None: a thread of its own)
        self._on_decode_step = on_decode_step
        self._activity = activity or Activity()
        self._n_ctx = n_ctx
        self._threads = threads
        self._slots = slots
        self._budget = budget
        self._stage_only = stage_only
        self._engine: LlamaCppEngine | None = None
        self._model: ModelHeld | None = None
        self._bytes = 0
        # The embedding context, made on the first Embed over the same file (see node.engines.embedder)
        self._embedder: Embedder | None = None
        self._embedder_of: LlamaCppEngine | None = None
        self._embedding_bytes = 0
        self._embedder_lock = threading.Lock()
        self._streams = 0
        self._retiring = False
        self._lock = threading.Lock()
        self._loading = budget.loading  # one load at a time on the node (see node.budget)
        budget.add_holder(lambda: self._bytes + self._embedding_bytes)

    @property
    def model(self) -> ModelHeld | None:
        """The model served as a replica (None: none, or being released)."""
        with self._lock:
            return None if self._retiring else self._model

    @property
    def layers(self) -> int:
        with self._lock:
            return self._model.n_layers if self._model is not None else 0

    def load(self, model_sha256: ModelSha, n_ctx: int = 0) -> ModelHeld:
        """Blocking: load llama.cpp on the node's file; loading what is held already returns it."""
        from mesh.placement.planner import Policy, replica_bytes
        from node.profile import model_profile

        local = self._local
        if self._stage_only:
            raise InvalidInput("this node was started with --role stage: it serves layer ranges only")
        if model_sha256 != local.model.sha256:
            raise NotFound(f"this node has no file with sha256 {model_sha256[:12]}…")
        if local.shards is not None:
            raise NotFound("this node holds only some layers of the model (--model-from-peers): stages only")
        n_ctx = n_ctx or self._n_ctx
        if not 0 < n_ctx <= MAX_STAGE_CTX:
            raise InvalidInput(f"n_ctx must be 1..{MAX_STAGE_CTX}, got {n_ctx}")
        with self._loading, self._activity.doing(f"loading the whole model {local.model.name}"):
            with self._lock:
                if self._model is not None and self._model.n_ctx == n_ctx:
                    self._retiring = False  # asked for again before its streams ended: keep it
                    return self._model
                if self._model is not None and self._streams:
                    raise Unavailable("the replica serves streams with another context; retry when they end")
            need = replica_bytes(model_profile(local.path, local.model.sha256),
                                 Policy(n_ctx=n_ctx, sessions_per_stage=self._slots))
            self._budget.check(need, f"the whole model {local.model.name} as a replica", replacing=self._bytes)
            started = time.monotonic()
            log.info("loading %s with llama.cpp (%d threads, context %d, %d slot(s))", local.path.name,
                     self._threads, n_ctx, self._slots)
            engine = LlamaCppEngine(local.path, n_ctx=n_ctx, threads=self._threads, slots=self._slots,
                                    compute=self._compute, on_step=self._on_decode_step)
            with self._lock:
                old, self._engine = self._engine, engine
                self._embedder, self._embedder_of, self._embedding_bytes = None, None, 0  # made anew on use
                self._model = ModelHeld(name=local.model.name, sha256=local.model.sha256,
                                        n_layers=local.model.n_layers, file_bytes=local.model.file_bytes,
                                        n_ctx=n_ctx, architecture=local.model.architecture,
                                        n_vocab=local.model.n_vocab)
                self._bytes, self._retiring = need, False
            if old is not None:
                old.close()  # it served no stream: a replica with streams is not reloaded (above)
            log.info("replica of %s ready in %.1fs", local.model.name, time.monotonic() - started)
            return self._model

    def release(self) -> str:
        """'released', 'pending' (freed when the streams in flight end) or 'absent'."""
        with self._lock:
            if self._model is None:
                return "absent"
            if self._streams:
                self._retiring = True
                log.info("releasing the replica once its %d stream(s) end", self._streams)
                return "pending"
            self._free_locked()
        log.info("released the replica")
        return "released"

    def _free_locked(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._model, self._bytes, self._retiring = None, None, 0, False
        self._embedder, self._embedder_of, self._embedding_bytes = None, None, 0

    def embedder(self, engine: LlamaCppEngine) -> Embedder:
        """Blocking (the first time: llama.cpp opens a context): the embedding context beside
        `engine`, made on first use within the node's memory budget, and dropped with the replica.
        Call it while holding `serving()`."""
        from node.profile import model_profile

        with self._embedder_lock:
            with self._lock:
                if self._embedder is not None and self._embedder_of is engine:
                    return self._embedder
            local = self._local
            profile = model_profile(local.path, local.model.sha256)
            n_ctx = min(engine.n_ctx, EMBED_CONTEXT_TOKENS)
            need = embedding_bytes(profile.kv_bytes_per_token_layer, profile.n_layers, profile.n_head,
                                   profile.n_embd, profile.n_vocab, n_ctx)
            with self._loading, self._activity.doing(f"opening an embedding context on {local.model.name}"):
                self._budget.check(need, f"an embedding context for {local.model.name}",
                                   replacing=self._embedding_bytes)
                embedder = Embedder(local.path, n_ctx=n_ctx, threads=self._threads, n_vocab=engine.n_vocab,
                                    metadata=engine.metadata)
            with self._lock:
                if self._engine is not engine:  # the replica was replaced meanwhile: this one is stale
                    raise Unavailable("the replica was reloaded while its embedding context opened; retry")
                self._embedder, self._embedder_of, self._embedding_bytes = embedder, engine, need
            return embedder

    @contextmanager
    def serving(self) -> Iterator[LlamaCppEngine]:
        """The engine for one stream; a replica being released takes none."""
        with self._lock:
            if self._engine is None or self._retiring:
                raise NotFound("this node serves no whole-model replica now (pipeline stages only)")
            engine = self._engine
            self._streams += 1
        try:
            yield engine
        finally:
            with self._lock:
                self._streams -= 1
                freed = self._retiring and self._streams == 0
                if freed:
                    self._free_locked()
            if freed:
                log.info("released the replica: its last stream ended")
