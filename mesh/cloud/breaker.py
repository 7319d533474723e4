"""A circuit breaker for the cloud upstream: pure logic and an injectable clock.

Why a breaker at all: during a cloud outage every request would otherwise pay a connect
error or, worse, a full first-token timeout before the gateway falls back to the mesh.
After `failure_threshold` consecutive failures the breaker opens and requests skip the
cloud at once; after `open_s` exactly one request (or a health probe) tries it again.

    closed --(threshold consecutive failures)--> open --(open_s passed, allow())--> half_open
    half_open --(probe succeeds)--> closed        half_open --(probe fails)--> open (timer restarts)

The breaker knows nothing about HTTP: callers ask `allow()` before a request and report the
outcome with `record_success()`, `record_failure()` or, when a request ended without a
verdict (the client went away, the request itself was malformed), `release()`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh.errors import ConfigError

log = logging.getLogger(__name__)


class BreakerState(str, enum.Enum):
    """A str enum so that `state.value` (and `str(state)`) is the label the metrics use."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BreakerConfig:
    # Consecutive failures (connect errors, HTTP 5xx/429, timeouts, broken streams) that open it.
    failure_threshold: int = 3
    # How long the breaker stays open before one probe request may try the cloud again.
    open_s: float = 5.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ConfigError(f"breaker failure_threshold must be at least 1, not {self.failure_threshold}")
        if self.open_s < 0:
            raise ConfigError(f"breaker open_s must not be negative, not {self.open_s}")


OnChange = Callable[[BreakerState, BreakerState], None]


class CircuitBreaker:
    """Thread-safe (one lock, never held while calling out), though the gateway uses it from
    one event loop. `on_change(old, new)` runs after every state change; the gateway sets its
    metrics and logs from it."""

    def __init__(self, config: BreakerConfig | None = None, *, on_change: OnChange | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or BreakerConfig()
        self.on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0  # consecutive failures seen while closed
        self._opened_at = 0.0
        self._probe_out = False  # half-open: the one request allowed through has not reported yet

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted so far (reset by a success while closed)."""
        return self._failures

    def seconds_until_probe(self) -> float:
        """While open: how long until a probe may go through (0 when it may now); else 0."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.open_s - self._clock())

    def allow(self) -> bool:
        """May a request go to the cloud now? Closed: yes. Open: no, until open_s has passed,
        then the breaker turns half-open and this caller is the probe. Half-open: only the one
        probe, so that a still-dead cloud costs one failed request, not one per client."""
        with self._lock:
            old = self._state
            if old is BreakerState.CLOSED:
                return True
            if old is BreakerState.OPEN:
                if self._clock() - self._opened_at < self.config.open_s:
                    return False
                self._state = BreakerState.HALF_OPEN
                self._probe_out = True
                allowed = True
            elif self._probe_out:
                allowed = False
            else:  # half-open and the previous probe was released without a verdict
                self._probe_out = True
                allowed = True
            new = self._state
        self._notify(old, new)
        return allowed

    def record_success(self) -> None:
        with self._lock:
            old = self._state
            if old is BreakerState.OPEN:
                # A request that started before the breaker opened: a stream that was already
                # flowing says little about whether new requests get through. The half-open
                # probe decides.
                return
            self._failures = 0
            self._probe_out = False
            self._state = BreakerState.CLOSED
        self._notify(old, BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            old = self._state
            self._failures += 1
            if old is BreakerState.OPEN:
                return  # a straggler must not push the next probe further out
            if old is BreakerState.CLOSED and self._failures < self.config.failure_threshold:
                return
            # Closed at the threshold, or the half-open probe failed: (re)open, timer restarts.
            self._probe_out = False
            self._opened_at = self._clock()
            self._state = BreakerState.OPEN
        self._notify(old, BreakerState.OPEN)

    def release(self) -> None:
        """A request that was allowed through ended without a verdict (the client left, or the
        cloud rejected this request's own content): free the half-open probe slot so that the
        next caller can probe instead of the breaker staying half-open forever."""
        with self._lock:
            self._probe_out = False

    def _notify(self, old: BreakerState, new: BreakerState) -> None:
        if old is new or self.on_change is None:
            return
        try:
            self.on_change(old, new)
        except Exception:
            # A broken metrics callback must not turn into a failed request or a stuck breaker.
            log.exception("circuit breaker on_change callback failed (%s -> %s)", old, new)
