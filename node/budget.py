"""The node's memory budget, shared by everything it holds (a replica and its stages).

Loads ask it before reading a byte: `--memory-limit` when given, else what is free now
plus what the node already holds (that memory is the node's to re-plan). The same figure
goes into Info as `memory_budget`, which a placement controller plans with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from mesh.errors import CapacityExhausted
from node.probe import memory


class MemoryBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes (0 = no limit given: free memory decides)
        self._holders: list[Callable[[], int]] = []
        # Held for a whole load (check, then read): two loads at once could each pass the
        # check and together exceed the budget.
        self.loading = threading.Lock()

    def add_holder(self, held_bytes: Callable[[], int]) -> None:
        """A source of held bytes (the stage host, the replica host)."""
        self._holders.append(held_bytes)

    def held(self) -> int:
        return sum(holder() for holder in self._holders)

    def total(self) -> int:
        """Bytes the node may use for models in all, counting what it holds now."""
        held = self.held()
        free_total = held + memory().free
        return min(self.limit, free_total) if self.limit else free_total

    def check(self, need: int, what: str, replacing: int = 0) -> None:
        """Refuse `need` more bytes (beyond `replacing`, which the load frees) past the budget."""
        held = self.held() - replacing
        total = self.total()
        if held + need > total:
            source = "--memory-limit" if self.limit and total == self.limit else "free memory"
            raise CapacityExhausted(
                f"{what} needs about {need / 2**20:.0f} MiB; with {held / 2**20:.0f} MiB already held that "
                f"exceeds this node's budget of {total / 2**20:.0f} MiB ({source})")
