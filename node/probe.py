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


def measure_decode_speed(path: Path, n_layers: int, threads: int) -> float:
    """Decode tokens/s this device would reach on the whole model, estimated from single-token
    steps through two of its layers on the stage engine (about half a second). Every node
    measures the same work, so the figures compare across nodes; the median of a few windows
    is kept, so a neighbour's burst does not make a node look slow, while a CPU quota does."""
    import time

    import numpy as np

    from node.engines.stage import StageEngine

    first = min(1, max(0, n_layers - PROBE_LAYERS))
    last = min(n_layers, first + PROBE_LAYERS)
    engine = StageEngine.load(path, first, last, n_ctx=PROBE_CTX, slots=1, threads=1)
    try:
        rng = np.random.default_rng(0)
        hidden = rng.normal(size=(1, engine.n_embd)).astype(np.float32)

        def step(position: int) -> None:
            if engine.is_first:
                engine.forward("probe", position, tokens=[1])
            else:
                engine.forward("probe", position, hidden=hidden)

        step(0)
        windows = []
        for _ in range(PROBE_WINDOWS):
            steps, started = 0, time.perf_counter()
            while time.perf_counter() - started < PROBE_WINDOW_S:
                step(1 + steps % (PROBE_CTX - 2))  # positions wrap: the session is truncated and reused
                steps += 1
            windows.append((time.perf_counter() - started) / steps)
            time.sleep(PROBE_GAP_S)
        median = sorted(windows)[len(windows) // 2]
    finally:
        engine.close()
    per_layer = median / (last - first)
    one_thread = 1.0 / (per_layer * n_layers) if per_layer > 0 else 0.0
    return one_thread * (1 + EXTRA_THREAD_GAIN * (max(1, threads) - 1))
