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
PROBE_STEPS = 8


def measure_decode_speed(path: Path, n_layers: int, threads: int) -> float:
    """Decode tokens/s this device would reach on the whole model, estimated from a few
    single-token steps through two of its layers on the stage engine (a fraction of a
    second on small models). The planner sizes pipeline stages in proportion to it."""
    import time

    import numpy as np

    from node.engines.stage import StageEngine

    first = min(1, max(0, n_layers - PROBE_LAYERS))
    last = min(n_layers, first + PROBE_LAYERS)
    engine = StageEngine.load(path, first, last, n_ctx=64, slots=1, threads=threads)
    try:
        rng = np.random.default_rng(0)
        shape = (1, engine.n_embd)
        if engine.is_first:
            engine.forward("probe", 0, tokens=[1])
        else:
            engine.forward("probe", 0, hidden=rng.normal(size=shape).astype(np.float32))
        started = time.perf_counter()
        for position in range(1, PROBE_STEPS + 1):
            if engine.is_first:
                engine.forward("probe", position, tokens=[1])
            else:
                engine.forward("probe", position, hidden=rng.normal(size=shape).astype(np.float32))
        per_layer = (time.perf_counter() - started) / PROBE_STEPS / (last - first)
    finally:
        engine.close()
    return 1.0 / (per_layer * n_layers) if per_layer > 0 else 0.0
