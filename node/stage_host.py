"""The pipeline stages a node holds: load a layer range on request, run session steps
through it, sample on the last stage, free sessions.

A node may hold several stages (of one file or several); each Forward step names the
stage it is for by model sha256 and layer range, so a re-plan can load a new range beside
the old one without confusing sessions in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mesh.constraints import Matcher
from mesh.errors import (
    CapacityExhausted,
    EdgeMeshError,
    InvalidInput,
    ModelError,
    NotFound,
    PeerError,
    Unauthenticated,
    Unavailable,
)
from mesh.metrics import NodeMetrics
from mesh.model_store import Progress
from mesh.sampling import check_request, sample
from mesh.types import LayerRange, ModelHeld, ModelSha, StageHeld, StageOutput, StageStep
from node.activity import Activity
from node.budget import MemoryBudget
from node.engines.stage import MAX_CHUNK, StageEngine
from node.shards import ShardCache, ShardSource, stage_byte_ranges
from node.speed import SpeedMeter

log = logging.getLogger(__name__)

MAX_STAGE_SLOTS = 64
MAX_STAGE_CTX = 32768


@dataclass(frozen=True)
class LocalFile:
    """A GGUF file on this node's disk, as stages see it: whole, or a sparse shard copy
    (`shards`) whose missing bytes come from `source`, a peer that holds the whole file."""

    path: Path
    model: ModelHeld
    shards: ShardCache | None = None
    source: ShardSource | None = None


StageKey = tuple[ModelSha, int, int]


class StageHost:
    def __init__(self, files: list[LocalFile], threads: int, metrics: NodeMetrics, decode_threads: int = 0,
                 budget: MemoryBudget | None = None, speed: SpeedMeter | None = None,
                 activity: Activity | None = None,
                 connect: Callable[[str], Awaitable[ShardSource]] | None = None) -> None:
        self._files = {f.model.sha256: f for f in files}
        self._connect = connect  # a proved connection to a peer that may ship shards
        self.activity = activity or Activity()
        self._budget = budget or MemoryBudget(0)
        self._budget.add_holder(self.held_bytes)
        self._speed = speed
        self._threads = threads
        # Single-token steps may use a different thread count than prefill chunks (--decode-threads),
        # e.g. to leave a core to other work on a shared device.
        self._decode_threads = decode_threads or threads
        self._metrics = metrics
        self._stages: dict[StageKey, tuple[StageEngine, StageHeld]] = {}
        # Stages being released: they finish the sessions they have, take no new ones, are
        # not reported in Info (so nobody routes to them), and close with their last session.
        self._retiring: set[StageKey] = set()
        self._fraction: dict[StageKey, float] = {}  # share of the model's weights a decode step touches
        self._lock = threading.Lock()  # guards the dict; each engine serializes its own compute
        # Grammar state of constrained sessions on a last stage, by session id (mesh.constraints).
        self._matchers: dict[str, Matcher] = {}
        # One load at a time on the node (stages and the replica share it through the budget):
        # two loads must not both pass the memory check and then exceed the budget together.
        self._loading = self._budget.loading

    def whole_file(self, model_sha256: ModelSha) -> Path:
        """A file this node can ship to others (not a shard copy)."""
        local = self._files.get(model_sha256)
        if local is None or local.shards is not None:
            raise NotFound(f"this node holds no whole copy of {model_sha256[:12]}…")
        return local.path

    async def ensure_present(self, model_sha256: ModelSha, layers: LayerRange, others: Sequence[str] = ()) -> None:
        """Fetch the bytes of `layers` first when this node only has a shard copy: from the peer
        it found at start or, when that one fails (it left), from the next of `others`
        (addresses of peers the controller says hold the whole file, each proved first)."""
        local = self._files.get(model_sha256)
        if local is None or local.shards is None or local.source is None:
            return
        ranges = stage_byte_ranges(local.path, layers)
        if not local.shards.missing(ranges):
            log.info("layers [%d, %d) are in the shard cache", layers.first, layers.last_exclusive)
            return
        with self.activity.doing(f"fetching layers [{layers.first}, {layers.last_exclusive})"):
            await self._fetch(model_sha256, local, layers, ranges, others)

    async def _fetch(self, model_sha256: ModelSha, local: LocalFile, layers: LayerRange,
                     ranges: list[tuple[int, int]], others: Sequence[str]) -> None:
        assert local.shards is not None and local.source is not None  # checked by ensure_present
        failures: list[str] = []
        source: ShardSource | None = local.source
        candidates = [a for a in others if a != local.source.address]
        while True:
            if source is not None:
                try:
                    fetched = await local.shards.fetch(source, local.shards.missing(ranges),
                                                       progress=self._shard_progress(layers, source.address))
                except (PeerError, Unavailable, Unauthenticated) as exc:
                    failures.append(str(exc))
                    log.warning("could not fetch layers [%d, %d): %s", layers.first, layers.last_exclusive, exc)
                else:
                    if source is not local.source:
                        self._files[model_sha256] = replace(local, source=source)  # later fetches start there
                    log.info("fetched %.1f MB of layers [%d, %d) from %s", fetched / 1e6, layers.first,
                             layers.last_exclusive, source.address)
                    return
            if not candidates or self._connect is None:
                raise Unavailable(f"no peer could send layers [{layers.first}, {layers.last_exclusive}): "
                                  + "; ".join(failures))
            address = candidates.pop(0)
            try:
                source = await self._connect(address)
            except EdgeMeshError as exc:
                failures.append(f"{address}: {exc}")
                source = None

    def _shard_progress(self, layers: LayerRange, address: str) -> Progress:
        def report(_what: str, done: int, total: int) -> None:
            self.activity.progress(f"shard of layers [{layers.first}, {layers.last_exclusive}) from {address}",
                                   done, total)
        return report

    @property
    def files(self) -> tuple[ModelHeld, ...]:
        return tuple(f.model for f in self._files.values())

    def held(self) -> tuple[StageHeld, ...]:
        """The stages this node serves (not those being released)."""
        with self._lock:
            return tuple(held for key, (_engine, held) in self._stages.items() if key not in self._retiring)

    def layers_loaded(self) -> int:
        """Layers in memory, those of stages being released included."""
        return sum(h.layers.count for _e, h in self._snapshot())

    def held_bytes(self) -> int:
        """Memory of every loaded stage, those being released included."""
        return sum(h.weight_bytes + h.kv_cache_bytes + h.compute_bytes for _e, h in self._snapshot())

    def load(self, model_sha256: ModelSha, layers: LayerRange, n_ctx: int, slots: int,
             prefill_chunk: int = 0) -> StageHeld:
        """Blocking: reads the layer range's tensors from disk. Loading a range already held
        with the same shape returns it as it is (idempotent, so a planner may retry); a range
        held with another shape is only replaced while none of its sessions is open."""
        with self._loading, self.activity.doing(f"loading layers [{layers.first}, {layers.last_exclusive})"):
            return self._load(model_sha256, layers, n_ctx, slots, prefill_chunk)

    def _load(self, model_sha256: ModelSha, layers: LayerRange, n_ctx: int, slots: int,
              prefill_chunk: int) -> StageHeld:
        local = self._files.get(model_sha256)
        if local is None:
            raise NotFound(f"this node has no file with sha256 {model_sha256[:12]}…")
        if layers.last_exclusive > local.model.n_layers:
            raise InvalidInput(f"layers [{layers.first}, {layers.last_exclusive}) exceed the model's "
                               f"{local.model.n_layers} layers")
        if not 0 < slots <= MAX_STAGE_SLOTS:
            raise InvalidInput(f"slots must be 1..{MAX_STAGE_SLOTS}, got {slots}")
        if not 0 < n_ctx <= MAX_STAGE_CTX:
            raise InvalidInput(f"n_ctx must be 1..{MAX_STAGE_CTX}, got {n_ctx}")
        chunk = prefill_chunk or MAX_CHUNK
        if not 0 < chunk <= MAX_CHUNK:
            raise InvalidInput(f"prefill_chunk must be 1..{MAX_CHUNK}, got {prefill_chunk}")
        key: StageKey = (model_sha256, layers.first, layers.last_exclusive)
        with self._lock:
            existing = self._stages.get(key)
        if existing is not None and existing[1].slots == slots and existing[0].n_ctx == n_ctx and \
                existing[1].prefill_chunk == chunk:
            with self._lock:
                self._retiring.discard(key)  # asked for again before its sessions ended: keep it
            return existing[1]
        if existing is not None and existing[0].sessions():
            raise CapacityExhausted(f"layers [{layers.first}, {layers.last_exclusive}) are serving "
                                    f"{existing[0].sessions()} session(s); cannot reshape them now")
        self._check_memory(local, layers, n_ctx, slots, chunk, replacing=existing[1] if existing else None)
        started = time.monotonic()
        log.info("loading stage layers [%d, %d) of %s (%d slots, context %d)", layers.first,
                 layers.last_exclusive, local.path.name, slots, n_ctx)
        engine = StageEngine.load(local.path, layers.first, layers.last_exclusive, n_ctx=n_ctx, slots=slots,
                                  threads=self._threads, max_chunk=chunk)
        held = StageHeld(model_sha256=model_sha256, layers=layers, slots=slots,
                         weight_bytes=engine.memory.weight_bytes, kv_cache_bytes=engine.memory.kv_cache_bytes,
                         compute_bytes=engine.memory.compute_bytes, prefill_chunk=chunk, n_ctx=n_ctx)
        fraction = _model_fraction(local, layers)  # reads the header: not under the lock steps take
        with self._lock:
            old = self._stages.pop(key, None)
            self._stages[key] = (engine, held)
            self._retiring.discard(key)
            self._fraction[key] = fraction
        if old is not None:
            old[0].close()
        log.info("stage [%d, %d) ready in %.1fs", layers.first, layers.last_exclusive, time.monotonic() - started)
        self._update_gauges()
        return held

    def _check_memory(self, local: LocalFile, layers: LayerRange, n_ctx: int, slots: int, chunk: int,
                      replacing: StageHeld | None) -> None:
        """Refuse a stage that would take this node past its memory budget (--memory-limit, or
        the memory free right now), before reading any byte."""
        from mesh.placement.planner import Policy, stage_bytes
        from node.profile import model_profile

        need = stage_bytes(model_profile(local.path, local.model.sha256),
                           Policy(n_ctx=n_ctx, sessions_per_stage=slots, prefill_chunk=chunk), layers)
        freed = replacing.weight_bytes + replacing.kv_cache_bytes + replacing.compute_bytes if replacing else 0
        self._budget.check(need, f"layers [{layers.first}, {layers.last_exclusive})", replacing=freed)

    def release_stage(self, model_sha256: ModelSha, layers: LayerRange) -> str:
        """Stop serving a layer range: 'released' (freed now), 'pending' (freed when its open
        sessions end; it takes no new ones) or 'absent' (not held)."""
        key: StageKey = (model_sha256, layers.first, layers.last_exclusive)
        with self._lock:
            found = self._stages.get(key)
            if found is None:
                return "absent"
            if found[0].sessions():
                self._retiring.add(key)
                log.info("releasing layers [%d, %d) once their %d session(s) end", layers.first,
                         layers.last_exclusive, found[0].sessions())
                return "pending"
            del self._stages[key]
            self._retiring.discard(key)
            self._fraction.pop(key, None)
        found[0].close()
        log.info("released layers [%d, %d)", layers.first, layers.last_exclusive)
        self._update_gauges()
        return "released"

    def _close_retired(self) -> None:
        with self._lock:
            done = [key for key in self._retiring if key in self._stages and not self._stages[key][0].sessions()]
            engines = [self._stages.pop(key)[0] for key in done]
            for key in done:
                self._retiring.discard(key)
                self._fraction.pop(key, None)
        for key, engine in zip(done, engines, strict=True):
            engine.close()
            log.info("released layers [%d, %d): their last session ended", key[1], key[2])
        if done:
            self._update_gauges()

    def _engine(self, step: StageStep) -> tuple[StageEngine, float]:
        key: StageKey = (step.model_sha256, step.layers.first, step.layers.last_exclusive)
        with self._lock:
            found = self._stages.get(key)
            retiring = key in self._retiring
            fraction = self._fraction.get(key, 0.0)
        if found is None:
            raise NotFound(f"no stage [{step.layers.first}, {step.layers.last_exclusive}) of "
                           f"{step.model_sha256[:12]}… is loaded here")
        if retiring and found[0].session_length(step.session_id) is None:
            # NOT_FOUND, not UNAVAILABLE: the node is healthy, the part moved (the gateway picks again).
            raise NotFound(f"layers [{step.layers.first}, {step.layers.last_exclusive}) are being released "
                           "and take no new sessions")
        return found[0], fraction

    def step(self, step: StageStep) -> StageOutput:
        """Blocking: one step of one session. Validates the input against the stage before
        any compute; the last stage samples so that only a token id goes back."""
        engine, fraction = self._engine(step)
        if engine.is_first != (step.tokens is not None):
            raise InvalidInput("the first stage takes token ids; later stages take hidden states")
        if step.tokens is not None and any(not 0 <= t < engine.n_vocab for t in step.tokens):
            raise InvalidInput(f"token ids must be below the vocabulary size {engine.n_vocab}")
        if step.hidden is not None and step.hidden.shape[1] != engine.n_embd:
            raise InvalidInput(f"hidden states have width {step.hidden.shape[1]}; this model's is {engine.n_embd}")
        if engine.is_last:
            check_request(step.sampling, step.top_logprobs, engine.n_vocab)
        matcher = self._matcher(step) if engine.is_last else None
        if self._speed is not None:
            self._speed.touch()
        started = time.monotonic()
        threads = self._decode_threads if step.n_tokens == 1 else self._threads
        try:
            result = engine.forward(step.session_id, step.start_position, tokens=step.tokens, hidden=step.hidden,
                                    threads=threads)
        except ModelError as exc:  # released between the lookup and the step: the part moved
            raise NotFound(f"layers [{step.layers.first}, {step.layers.last_exclusive}): {exc}") from None
        kind = "decode" if step.n_tokens == 1 else "prefill"
        elapsed = time.monotonic() - started
        self._metrics.stage_step.labels(kind).observe(elapsed)
        if kind == "decode" and self._speed is not None:
            self._speed.record_stage_step(elapsed, fraction)
        self._metrics.stage_sessions.set(sum(e.sessions() for e, _ in self._snapshot()))
        if not engine.is_last:
            return StageOutput(step=step.step, hidden=result)
        position = step.start_position + step.n_tokens  # where the sampled token will sit
        masked = result if matcher is None else matcher.mask(result)
        chosen = sample(masked, step.sampling, step.history, position, step.logprobs, step.top_logprobs,
                        raw_logits=result)
        return StageOutput(step=step.step, token_id=chosen.token_id, logprob=chosen.logprob, top_logprobs=chosen.top)

    def _matcher(self, step: StageStep) -> Matcher | None:
        """The session's grammar, advanced past the generated tokens this step brings, before any
        compute (a bad grammar or token is INVALID_ARGUMENT and costs nothing)."""
        with self._lock:
            matcher = self._matchers.get(step.session_id)
        if step.constraint is not None:
            if matcher is not None:
                raise InvalidInput("the session's constraint is sent once, with its first step")
            local = self._files.get(step.model_sha256)
            if local is None:
                raise NotFound(f"this node has no file with sha256 {step.model_sha256[:12]}…")
            matcher = Matcher.for_model(local.path, step.constraint)
            with self._lock:
                # Every session end comes through release(), which drops its matcher; the cap only
                # bounds what a peer opening sessions without ever ending them could pile up.
                if len(self._matchers) >= MAX_STAGE_SLOTS * 4:
                    raise CapacityExhausted("too many constrained sessions open on this stage")
                self._matchers[step.session_id] = matcher
        if matcher is None:
            if step.generated:
                raise InvalidInput("constrained_tokens on a session that has no constraint")
            return None
        matcher.consume(step.generated)
        return matcher

    def release(self, session_id: str) -> bool:
        with self._lock:
            self._matchers.pop(session_id, None)
        released = False
        for engine, _held in self._snapshot():
            released = engine.release(session_id) or released
        self._close_retired()
        self._metrics.stage_sessions.set(sum(e.sessions() for e, _ in self._snapshot()))
        return released

    def sessions(self) -> int:
        return sum(e.sessions() for e, _ in self._snapshot())

    def _snapshot(self) -> list[tuple[StageEngine, StageHeld]]:
        with self._lock:
            return list(self._stages.values())

    def _update_gauges(self) -> None:
        stages = self._snapshot()
        for kind, value in (("weights", sum(h.weight_bytes for _, h in stages)),
                            ("kv_cache", sum(h.kv_cache_bytes for _, h in stages)),
                            ("compute", sum(h.compute_bytes for _, h in stages))):
            self._metrics.stage_memory.labels(kind).set(value)

    def close(self) -> None:
        for engine, _ in self._snapshot():
            engine.close()
        with self._lock:
            self._stages.clear()


def _model_fraction(local: LocalFile, layers: LayerRange) -> float:
    """Share of the model's weights one decode step through `layers` reads: its blocks, plus
    the output head on the last stage (the first stage's embedding is a row lookup)."""
    from node.profile import model_profile

    profile = model_profile(local.path, local.model.sha256)
    whole = sum(profile.layer_bytes) + profile.head_bytes
    touched = sum(profile.layer_bytes[layers.first:layers.last_exclusive])
    touched += profile.head_bytes if layers.last_exclusive == profile.n_layers else 0
    return touched / whole if whole else 0.0
