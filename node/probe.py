"""Device capability: memory and threads (decode-speed measurement joins with the planner)."""

from __future__ import annotations

import os
from dataclasses import dataclass


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
