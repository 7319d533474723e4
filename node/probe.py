"""Device capability: memory, threads, and measured decode speed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Memory:
    total: int
    free: int


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * 1024  # the file reports kB
    except OSError:
        pass
    return values


def memory() -> Memory:
    """Physical memory and what is available now (MemAvailable, which counts reclaimable cache)."""
    info = _meminfo()
    page = os.sysconf("SC_PAGE_SIZE")
    total = info.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * page
    free = info.get("MemAvailable") or os.sysconf("SC_AVPHYS_PAGES") * page
    return Memory(total=total, free=free)


def default_threads() -> int:
    """All cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


PROBE_LAYERS = 2
PROBE_WINDOWS = 5  # the median of several windows: a burst of other work spoils one or two, not the median
# Two CFS periods (100 ms each): a cgroup CPU quota shows in every window at its true share
# (a window of one period can catch two quota slices and look twice as fast).
PROBE_WINDOW_S = 0.2
PROBE_GAP_S = 0.15  # windows spread over ~2 s, so one burst of another process spoils few of them
PROBE_CTX = 64
# The probe runs on one thread: several nodes starting together on one machine (tests, a
# desktop running two nodes) each probing with an OpenMP team of all cores oversubscribe
# them, and OpenMP barriers then stall at random (measured: 3.7, 9.6 and 76.8 tok/s for three
# identical nodes). One thread per probe is stable; the device's figure scales it by its
# threads with the efficiency measured here for a second thread (250 -> 405 tok/s: 0.62).
EXTRA_THREAD_GAIN = 0.62


class DecodeProbe:
    """Single-token steps through two of the model's layers on the stage engine, one thread,
    timed in windows. Open, window and close run on the node's compute thread; whoever drives
    it waits PROBE_GAP_S between windows off that thread (so a request is never held up by
    more than one window)."""

    def __init__(self, path: Path, n_layers: int) -> None:
        import numpy as np

        from node.engines.stage import StageEngine

        self._first = min(1, max(0, n_layers - PROBE_LAYERS))
        self._last = min(n_layers, self._first + PROBE_LAYERS)
        self._n_layers = n_layers
        self._engine = StageEngine.load(path, self._first, self._last, n_ctx=PROBE_CTX, slots=1, threads=1)
        self._hidden = np.random.default_rng(0).normal(size=(1, self._engine.n_embd)).astype(np.float32)
        self._position = 0
        self._step()

    def _step(self) -> None:
        if self._engine.is_first:
            self._engine.forward("probe", self._position, tokens=[1])
        else:
            self._engine.forward("probe", self._position, hidden=self._hidden)
        self._position = 1 + self._position % (PROBE_CTX - 2)  # positions wrap: the session is reused

    def window(self) -> float:
        """Seconds per step over PROBE_WINDOW_S."""
        import time

        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < PROBE_WINDOW_S:
            self._step()
            steps += 1
        return (time.perf_counter() - started) / steps

    def tokens_per_second(self, windows: list[float], threads: int) -> float:
        """Whole-model decode tokens/s this device would reach with `threads`, from the
        median window (a burst of other work spoils one or two windows, not the median)."""
        per_layer = sorted(windows)[len(windows) // 2] / (self._last - self._first)
        one_thread = 1.0 / (per_layer * self._n_layers) if per_layer > 0 else 0.0
        return one_thread * (1 + EXTRA_THREAD_GAIN * (max(1, threads) - 1))

    def close(self) -> None:
        self._engine.close()


def measure_decode_speed(path: Path, n_layers: int, threads: int) -> float:
    """Decode tokens/s this device would reach on the whole model, from PROBE_WINDOWS windows
    of a DecodeProbe (about 2 s, blocking). Every node measures the same work, so the figures
    compare across nodes; a neighbour's burst does not make a node look slow, a CPU quota does."""
    import time

    probe = DecodeProbe(path, n_layers)
    try:
        windows = []
        for _ in range(PROBE_WINDOWS):
            windows.append(probe.window())
            time.sleep(PROBE_GAP_S)
        return probe.tokens_per_second(windows, threads)
    finally:
        probe.close()
