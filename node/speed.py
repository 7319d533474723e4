"""The node's decode speed, two ways.

- For planning: the probe (node.probe), the same work on every node, so the figures
  compare across nodes. It is taken at start (often while other nodes on the same machine
  load) and again whenever the node has been idle for a while, so it follows what the
  device can do now (a CPU quota, a thermal limit, another program).
- For people: real single-token steps, a stage's step time scaled to the whole model by
  the share of the model's weights it touched, or a replica's token rate, smoothed.
  These are not planned on: a step has a fixed cost and the last stage carries the output
  head, so a node with few layers looks slower than it is (measured: 44 to 121 tok/s
  across three equal stages on one machine), and planning on that would shrink its share
  again and again.
"""

from __future__ import annotations

import random
import threading
import time

from mesh.types import IDLE_PROBE, STARTUP_PROBE

SMOOTHING = 0.2  # weight of the newest real-step measurement
REPROBE_FIRST_S = 15.0  # the first re-probe, once the start-up rush is over
REPROBE_EVERY_S = 60.0
REPROBE_JITTER_S = 10.0
IDLE_BEFORE_PROBE_S = 5.0  # a re-probe waits for this much quiet, so it measures the device, not our own load


class SpeedMeter:
    def __init__(self, probe_tokens_per_second: float) -> None:
        self._probe = probe_tokens_per_second
        # Nodes started together must not re-probe together (they would measure each other).
        self._probed_at = time.monotonic() + random.uniform(0, REPROBE_JITTER_S)
        self._source = STARTUP_PROBE
        self._steps = 0.0  # smoothed real-step speed (0 = none yet)
        self._active_at = 0.0
        self._lock = threading.Lock()

    def touch(self) -> None:
        """The node is doing real work now (a re-probe waits)."""
        with self._lock:
            self._active_at = time.monotonic()

    def record_stage_step(self, seconds: float, model_fraction: float) -> None:
        """One single-token step through a stage holding `model_fraction` of the model's weights."""
        if seconds > 0 and model_fraction > 0:
            self._record(model_fraction / seconds)

    def record_tokens(self, tokens: int, seconds: float) -> None:
        """A replica generated `tokens` after its first in `seconds`."""
        if tokens > 0 and seconds > 0:
            self._record(tokens / seconds)

    def _record(self, tokens_per_second: float) -> None:
        with self._lock:
            self._active_at = time.monotonic()
            self._steps = tokens_per_second if not self._steps else \
                SMOOTHING * tokens_per_second + (1 - SMOOTHING) * self._steps

    def record_probe(self, tokens_per_second: float) -> None:
        with self._lock:
            self._source = IDLE_PROBE
            self._probe = tokens_per_second
            self._probed_at = time.monotonic() + random.uniform(0, REPROBE_JITTER_S)

    def idle(self) -> bool:
        """No real work for IDLE_BEFORE_PROBE_S."""
        with self._lock:
            return time.monotonic() - self._active_at >= IDLE_BEFORE_PROBE_S

    def postpone(self) -> None:
        """A re-probe was cut short by real work: the next one waits for quiet again."""
        with self._lock:
            self._active_at = time.monotonic()

    def probe_due(self, started_at: float) -> bool:
        """Whether a re-probe should run now: due, and the node has been quiet."""
        now = time.monotonic()
        with self._lock:
            wait = REPROBE_FIRST_S if self._source == STARTUP_PROBE else REPROBE_EVERY_S
            due = now - max(self._probed_at, started_at) >= wait
            return due and now - self._active_at >= IDLE_BEFORE_PROBE_S

    @property
    def tokens_per_second(self) -> float:
        """What planners use: the latest probe."""
        with self._lock:
            return self._probe

    @property
    def step_tokens_per_second(self) -> float:
        """What real decode steps showed (0 = none yet)."""
        with self._lock:
            return self._steps

    @property
    def source(self) -> str:
        with self._lock:
            return self._source
